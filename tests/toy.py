"""Toy inputs the sampling and serving tests share: ragged prompts and a tokenizer whose
strings span tokens (so stop strings straddle token boundaries)."""

PROMPTS = [[5, 17, 99, 3, 42, 7, 8], [11, 12], [200, 1, 2, 3, 4, 5, 6, 7, 9, 10, 33, 44, 55],
           [9], [77, 78, 79, 80], [3, 1, 4, 1, 5, 9, 2, 6]]


class CharTokenizer:
  """Token t decodes to chr(ord('a') + t % 26)."""

  def decode(self, ids):
    return "".join(chr(ord("a") + t % 26) for t in ids)
