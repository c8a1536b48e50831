"""Fine-tuning support: LoRA targets and PEFT defaults, chat rows to assistant-only labels, the chunked training loss,
and the opt-in graphed training step.

Imports ``kernels`` only: like transformers' loss and Trainer code, it receives the model and asks it.
"""
