"""Training: the shared run setup, the loop, the step, and the SFT and preference runners."""
