"""Activation on install: a fresh Python process that never imports this package still gets its classes.

Every test runs a new interpreter (``python -c``) whose code does not import ``transformers_qwen35``: only the
``transformers_qwen35_autoload.pth`` file that ``pip install`` put into site-packages can bring the package in.
``TRANSFORMERS_QWEN35_AUTOLOAD=0`` must give built-in transformers' classes back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from transformers_qwen35.cli.demo import build_demo_checkpoint

ENV_SWITCH = "TRANSFORMERS_QWEN35_AUTOLOAD"
OURS = "transformers_qwen35"
BUILTIN = "transformers.models.qwen3_5"


def run_fresh(code: str, *, switch: str | None = None, timeout: float = 180) -> dict:
    """Run ``code`` in a new interpreter (no import of ours in it) and return the JSON it prints last."""
    env = {key: value for key, value in os.environ.items() if key != ENV_SWITCH}
    if switch is not None:
        env[ENV_SWITCH] = switch
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout, env=env
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return build_demo_checkpoint(tmp_path_factory.mktemp("demo"), seed=1)


AUTO_CLASSES = """
import json, sys
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor
from transformers import AutoModelForSequenceClassification
import transformers

path = sys.argv[1] if len(sys.argv) > 1 else {path!r}
config = AutoConfig.from_pretrained(path)
print(json.dumps({{
    "config": type(config).__module__,
    "causal_lm": type(AutoModelForCausalLM.from_pretrained(path)).__module__,
    "vl": type(AutoModelForImageTextToText.from_pretrained(path)).__module__,
    "reward": type(AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)).__module__,
    "top_level": getattr(transformers, config.architectures[0]).__module__,
    "causal_top_level": transformers.Qwen3_5ForCausalLM.__module__,
    "processor": type(AutoProcessor.from_pretrained(path)).__module__,
    "imported": "transformers_qwen35" in sys.modules,
}}))
"""


def test_a_plain_script_gets_our_classes(demo_dir):
    found = run_fresh(AUTO_CLASSES.format(path=str(demo_dir)))
    assert found.pop("imported") is True
    assert all(module.startswith(OURS) for module in found.values()), found


def test_the_switch_gives_builtin_classes_back(demo_dir):
    code = AUTO_CLASSES.format(path=str(demo_dir)).replace(
        '"processor": type(AutoProcessor.from_pretrained(path)).__module__,', ""
    )  # built-in's processor needs torchvision
    found = run_fresh(code, switch="0")
    assert found.pop("imported") is False
    assert all(module.startswith(BUILTIN) for module in found.values()), found


def test_pipeline_from_the_readme_runs_on_our_classes(demo_dir):
    """The README's snippet, with no import of ours: images work without torchvision (built-in's processor needs
    it), and the model is ours."""
    found = run_fresh(f"""
        import json, sys
        import numpy as np
        from PIL import Image
        from transformers import pipeline
        pipe = pipeline("image-text-to-text", model={str(demo_dir)!r})
        image = Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8))
        out = pipe(text=[{{"role": "user", "content": [{{"type": "image", "image": image}},
                                                     {{"type": "text", "text": "What is it?"}}]}}],
                   max_new_tokens=3)
        print(json.dumps({{"model": type(pipe.model).__module__, "processor": type(pipe.processor).__module__,
                          "answered": isinstance(out[0]["generated_text"], (str, list))}}))
    """)
    assert found == {"model": OURS + ".model.multimodal", "processor": OURS + ".chat.processing", "answered": True}


def test_importing_transformers_alone_costs_nothing_more():
    """The hook is there from interpreter start; `import transformers` does not import us (nor torch): only a lookup
    of a name that leads to a Qwen3.5 class does."""
    found = run_fresh("""
        import json, sys
        hooked = "transformers_qwen35_autoload" in sys.modules
        import transformers
        after_import = "transformers_qwen35" in sys.modules
        torch_after_import = "torch" in sys.modules
        transformers.__version__, transformers.logging
        after_unrelated_names = "transformers_qwen35" in sys.modules
        transformers.AutoTokenizer
        print(json.dumps([hooked, after_import, torch_after_import, after_unrelated_names,
                          "transformers_qwen35" in sys.modules]))
    """)
    assert found == [True, False, False, False, True]


def test_no_transformers_no_cost():
    found = run_fresh("""
        import json, sys
        print(json.dumps(sorted(name for name in sys.modules if name.startswith(("transformers", "torch")))))
    """)
    assert found == ["transformers_qwen35_autoload"]


def test_every_route_to_the_factories_activates():
    """Importing the factories from their module (not the top level), the second `transformers` module object that
    transformers.processing_utils creates, and the switch set in os.environ at run time."""
    found = run_fresh("""
        import json, os, sys
        import transformers as first
        from transformers import ProcessorMixin  # re-executes transformers/__init__.py: a second module object
        second = sys.modules["transformers"]
        from transformers.models.auto.modeling_auto import AutoModelForCausalLM
        from transformers_qwen35_autoload import ENV
        print(json.dumps({
            "two_objects": first is not second,
            "direct": "transformers_qwen35" in sys.modules,
            "first": first.Qwen3_5ForConditionalGeneration.__module__,
            "second": second.Qwen3_5ForConditionalGeneration.__module__,
            "env": ENV,
        }))
    """)
    assert found == {
        "two_objects": True,
        "direct": True,
        "first": OURS + ".model.multimodal",
        "second": OURS + ".model.multimodal",
        "env": ENV_SWITCH,
    }
    switched = run_fresh("""
        import json, os, sys
        os.environ["TRANSFORMERS_QWEN35_AUTOLOAD"] = "off"
        from transformers import AutoModelForCausalLM
        import transformers
        builtin = transformers.Qwen3_5ForCausalLM.__module__
        import transformers_qwen35  # an explicit import activates whatever the switch says
        print(json.dumps([builtin, transformers.Qwen3_5ForCausalLM.__module__]))
    """)
    assert switched == [BUILTIN + ".modeling_qwen3_5", OURS + ".model.modeling"]


def test_builtin_reference_modules_are_untouched():
    found = run_fresh("""
        import json
        from transformers import AutoModelForCausalLM
        from transformers.models.qwen3_5 import Qwen3_5ForCausalLM, Qwen3_5Config
        from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5ForConditionalGeneration
        print(json.dumps([c.__module__ for c in (Qwen3_5ForCausalLM, Qwen3_5Config, Qwen3_5ForConditionalGeneration)]))
    """)
    assert all(module.startswith(BUILTIN) for module in found), found


def test_threads_that_look_up_a_factory_together_all_get_our_classes():
    """One thread activates; the others wait for it rather than get built-in's classes half-way through.

    transformers' own lazy imports are not thread-safe on first use (concurrent first `from transformers import
    AutoConfig` raise ImportError now and then, with or without this package), so the process settles them first with
    names that do not activate us."""
    found = run_fresh("""
        import json, sys, threading
        from transformers import GenerationMixin, PreTrainedModel, ProcessorMixin
        assert "transformers_qwen35" not in sys.modules

        config = {"model_type": "qwen3_5_text", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 37,
                  "num_hidden_layers": 2, "layer_types": ["linear_attention", "full_attention"],
                  "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "linear_key_head_dim": 8,
                  "linear_value_head_dim": 8, "linear_num_key_heads": 2, "linear_num_value_heads": 2}
        start, built = threading.Barrier(4), []

        def load():
            start.wait()
            from transformers import AutoConfig, AutoModelForCausalLM
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
            built.append(type(model).__module__)

        threads = [threading.Thread(target=load) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        print(json.dumps(built))
    """)
    assert found == [OURS + ".model.modeling"] * 4
