"""The PyTorch forms of the Gated DeltaNet layer's operations (exact, any device): the reference fla's kernels are
tested against, and the path taken wherever those kernels cannot run."""
