"""Helpers of the transformers parity tests in this folder. Import it after
`pytest.importorskip("torch")`, as the tests do."""

import torch


def randomise_torch(model: torch.nn.Module, seed: int, *, weight_scale: float = 0.08) -> None:
  """Replaces every parameter of `model` with seeded noise, in place: norms 1 + 0.2 * noise,
  biases 0.2 * noise, the rest `weight_scale` * noise. HF initialises norms to one and biases
  to zero, which would hide a mis-mapped tensor."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if "norm" in name:
        p.copy_(1.0 + 0.2 * noise)
      elif name.endswith("bias"):
        p.copy_(0.2 * noise)
      else:
        p.copy_(weight_scale * noise)
