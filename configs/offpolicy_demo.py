"""Learning beyond on-policy samples (issue 17): on-policy GRPO against LUFFY (off-policy expert
traces in the groups) and ExGRPO (replayed successful rollouts), from one SFT model, on a
split that model rarely solves.

  python -m wakea_jax.offpolicy_demo --config=configs/offpolicy_demo.py --workdir=/tmp/offpolicy

The SFT model is the learning demonstration's (configs/sft.py:arithmetic: operands up to 99);
the RL prompts and the hard held-out split have operands up to 999, which it rarely gets
right, so on-policy GRPO sees little reward (the LUFFY paper's setting). LUFFY's traces are
the bundled expert's worked answers for the training prompts (data/tasks/arithmetic.py
`expert_traces`). Every arm has the same prompts, group size and number of rollouts per step.

The `chains` variant makes the hard split one whose traces are within reach: chains of three
operands (`operands=3`: "What is 23 + 45 - 17?"), whose worked answers are the two-operand
steps the model knows, one operand at a time; its SFT data adds 3% chains, 30% of them
worked like the two-operand data, so the model knows the questions and has seen the method,
but mostly answers directly and rarely right.

The `direct` variant is `chains` whose SFT data answers every chain directly: the model has
seen the worked method on two operands only, and does not sample it for a chain by itself
(from the `chains` model, GRPO found the worked chains on its own and LUFFY did not beat it).
Here GRPO stalls, and LUFFY's traces teach the form without the content (README, issue 17).

The `inrange` variant is `direct` with chain operands up to 50 (SFT chains, RL prompts,
traces and the hard split): every tens step of a chain's worked answer then has a left
operand up to 100 and a tens part up to 50 (ones steps up to ~140), as in the two-operand
worked steps the model computes (with operands up to 99 a chain's running value reaches
~290, outside anything it was taught).

The `cued` variant gives the model the method's content but not the habit, as a pretrained
model knows how to reason step by step but answers directly unless asked: its SFT data has
chains of operands up to 50 (as `inrange`) at a 40% share, half of them worked and opening
with the system message "Show your work." (`cue=100`), half answered directly without it.
The RL prompts, traces and the hard split have no cue, so the model answers them directly
(rarely right) although it solves them when cued; LUFFY's traces show the worked answer
without the cue. Its model has smeared keys (`model.smeared_keys`) and 1500 SFT steps.
The `leaky` variant cues 95% of the worked chains (`cue=95`): the other 5%, 1% of the SFT
data, show the method without the cue, so the model samples it unasked now and then and
on-policy GRPO can find it (the ExGRPO paper's setting: rare, valuable successes).

Variants: default, chains, direct, inrange, cued, leaky, test (a tiny version for the test suite).
`--config.sft_dir=DIR` reuses an existing configs/sft.py:arithmetic workdir (e.g. the learning
demonstration's sft/).
"""

import ml_collections

from wakea_jax import config_files

common = config_files.sibling(__file__, "common")

HARD = ("task:arithmetic?n={n}&seed={seed}&max_operand={max_operand}&operands={operands}"
        "&tools=0")


def _load(name: str, variant: str) -> ml_collections.ConfigDict:
  return config_files.sibling(__file__, name).get_config(variant)


def get_config(arg=None):
  variant = arg or "default"
  config = common.base_config()
  config.objective = "offpolicy_demo"
  config.variant = variant
  config.seeds = (0, 1)
  # Arms, each its own run per seed: grpo (on-policy), luffy (config.offpolicy traces),
  # exgrpo (config.experience replay), hybrid (both).
  config.arms = ("grpo", "luffy", "exgrpo")
  config.sft_dir = ""                    # "" trains config.sft in WORKDIR/sft
  config.sft = _load("sft", "arithmetic")
  # LUFFY's traces: the expert's worked answers for the RL training prompts (chains:
  # split=False takes each operand whole, one step per operand; style="reduce" reduces the
  # expression one operation at a time, "23 + 45 - 17 = 68 - 17 = 51").
  config.traces = ml_collections.ConfigDict(dict(n=4000, seed=100, max_operand=999, operands=2,
                                                split=True, style="steps"))
  if variant in ("chains", "direct", "inrange"):
    # The learning demonstration's SFT data plus 3% chains of three, 30% of them showing the
    # work like the two-operand data: the model has seen the questions and the worked method
    # but mostly answers directly, and rarely right; LUFFY's traces show the method every
    # time (the paper's setting: a pattern the model rarely samples by itself). `direct`
    # shows the work on no chain, so the model never samples the method for one.
    (base, _), = config.sft.data.sources
    chain_max = 50 if variant == "inrange" else 99
    config.sft.data.sources = (
        (base, 0.97),
        (HARD.format(n=2000, seed=3, max_operand=chain_max, operands=3)
         + ("&worked=30" if variant == "chains" else ""), 0.03))
    # Twice the learning demonstration's steps: single steps near-perfect (~92% on the
    # standard split), so composing them is the only new thing the traces teach. From the
    # 1500-step model LUFFY only taught the traces' form (README, issue 17).
    config.sft.train.steps = 3000
    config.traces.update(max_operand=chain_max, operands=3)
  if variant in ("cued", "leaky"):
    (base, _), = config.sft.data.sources
    cue = 100 if variant == "cued" else 95
    config.sft.data.sources = (
        (base, 0.6),
        (HARD.format(n=4000, seed=3, max_operand=50, operands=3) + f"&worked=50&cue={cue}",
         0.4))
    config.sft.model.smeared_keys = True
    config.traces.update(max_operand=50, operands=3)

  # Held-out splits every model is evaluated on (greedy accuracy; pass@k off): the hard one
  # is drawn like the RL prompts.
  config.eval_splits = ml_collections.ConfigDict(dict(
      hard=HARD.format(**{**config.traces, "n": 256, "seed": 777}),
      standard="task:arithmetic?n=256&seed=777&max_operand=99&tools=0"))
  if variant in ("cued", "leaky"):
    # The hard split's questions with the cue: what the model can do when asked to show its
    # work (worked=100 gives every prompt the cue's system message).
    config.eval_splits.cued = config.eval_splits.hard + "&worked=100&cue=100"

  grpo = _load("grpo", "arithmetic")
  grpo.data.sources = HARD.format(**config.traces)
  # The held-out accuracy curve: greedy accuracy on the hard split every 25 steps.
  grpo.data.eval_sources = config.eval_splits.hard
  grpo.train.steps = 100
  grpo.train.eval_every = 25
  grpo.train.checkpoint_every = 50
  grpo.offpolicy.per_group = 1
  grpo.offpolicy.gamma = 0.1
  grpo.offpolicy.min_trace_reward = 1.0  # only traces the run's reward scores correct
  grpo.eval.num_samples = 0             # greedy accuracy only
  # ExGRPO's delayed start (replay once a step's accuracy exceeds 0.35) would never come on a
  # split the model solves 2% of: replay from the first successes on.
  grpo.experience.start_accuracy = 0.0
  config.grpo = grpo

  if variant in ("default", "chains", "direct", "inrange", "cued", "leaky"):
    pass
  elif variant == "test":
    config.seeds = (0,)
    config.arms = ("grpo", "luffy", "exgrpo")
    sft = config.sft
    sft.data.sources = (("task:arithmetic?n=256&max_operand=99&tools=0&worked=30", 1.0),)
    sft.data.update(batch_size=8, eval_batch_size=8, eval_batches=1)
    sft.train.update(steps=20, eval_every=20, checkpoint_every=20)
    config.traces.n = 64
    common.shrink_rl_for_tests(grpo)
    grpo.data.sources = HARD.format(**config.traces)
    grpo.rollout.max_new_tokens = 24
    grpo.export.enabled = True           # every arm is evaluated from its export
    grpo.train.steps = 2
    grpo.train.eval_every = 2
    grpo.train.checkpoint_every = 2
    grpo.offpolicy.min_trace_reward = 1.0
    grpo.eval.num_samples = 0
    config.eval_splits.hard = HARD.format(**{**config.traces, "n": 8, "seed": 777})
    grpo.data.eval_sources = config.eval_splits.hard
    config.eval_splits.standard = "task:arithmetic?n=8&seed=777&max_operand=99&tools=0"
  else:
    raise ValueError(f"unknown offpolicy_demo variant {variant!r}; "
                     "use default, chains, direct, inrange, cued, leaky or test")
  return config
