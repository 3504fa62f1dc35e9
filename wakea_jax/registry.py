r"""Model registry binary: list, show, compare, promote and register model versions; record
per-category evaluations and serving figures; find weaknesses; select a model for a role.

  python -m wakea_jax.registry --registry=/models/reg list
  python -m wakea_jax.registry --registry=/models/reg register --name=tiny \
      --checkpoint=/tmp/sft [--parent=tiny:1 --objective=sft --data_sources=a.jsonl,b.jsonl \
      --notes="..." --copy --config=configs/sft.py:quickstart]
  python -m wakea_jax.registry --registry=/models/reg show tiny[:2|@production]
  python -m wakea_jax.registry --registry=/models/reg compare tiny:1 tiny:2
  python -m wakea_jax.registry --registry=/models/reg promote tiny:2 [--stage=production]
  python -m wakea_jax.registry --registry=/models/reg evaluate tiny:2 \
      --config=configs/grpo.py:arithmetic          # per category, recorded in the registry
  python -m wakea_jax.registry --registry=/models/reg measure tiny:2 [--max_new_tokens=32 \
      --prompts_file=prompts.txt]                 # serving figures without a server, recorded
  python -m wakea_jax.registry --registry=/models/reg record-serving tiny:2 --figures=bench.json
  python -m wakea_jax.registry --registry=/models/reg weaknesses tiny:2 [--threshold=0.5 \
      --margin=0.05 --min_n=8] [--targeted_out=weak.jsonl --n_per_category=256 \
      --kind=prompts --config=configs/grpo.py:arithmetic --workdir=/tmp/followup \
      [--follow_up_override=train.steps=100 ...] [--start]]
  python -m wakea_jax.registry --registry=/models/reg select --role=chat_frontend.json

--registry defaults to $WAKEA_REGISTRY. `weaknesses` with --targeted_out writes training data
for the weak categories and prints the follow-up run's command (the --config run started
from the version's checkpoint, trained on that file); --start runs it. Register its result
with --parent=NAME:VERSION to keep the lineage. --figures is a JSON object of serving
figures (p50_latency_ms, p95_latency_ms, tokens_per_s, peak_memory_mb, ...).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from absl import app, flags
from ml_collections import config_flags

from wakea_jax import logs
from wakea_jax.serving import selection, tracking, weakness
from wakea_jax.serving.registry import ModelVersion, Registry, RegistryError
from wakea_jax.serving.results import overall_accuracy

FLAGS = flags.FLAGS
# `measure`'s default requests: short questions of the bundled tasks' kinds.
MEASURE_PROMPTS = ("What is 23+19?", "Compute 47*6.", "How much is 905-388?",
                   "What is the capital of Japan?", "Count 4 numbers starting at 7.",
                   "Hello, I am Ada.", "What colour is the sky?", "Thanks a lot.")


def _define_flags() -> None:
  flags.DEFINE_string("registry", os.environ.get("WAKEA_REGISTRY", ""),
                      "Registry directory (default: $WAKEA_REGISTRY).")
  config_flags.DEFINE_config_file(
      "config", None, "evaluate: an RL config (eval prompts, rollout, reward); register: the "
      "run's config to snapshot; weaknesses: the follow-up run's config.", lock_config=True)
  flags.DEFINE_string("stage", "production", "promote: the stage alias to point.")
  flags.DEFINE_string("name", "", "register: the model name.")
  flags.DEFINE_string("checkpoint", "", "register: model dir, run workdir or HF dir.")
  flags.DEFINE_string("parent", "", "register: the version it was trained from.")
  flags.DEFINE_string("objective", "", "register: e.g. sft, grpo.")
  flags.DEFINE_list("data_sources", [], "register: the training data specs.")
  flags.DEFINE_string("notes", "", "register: free text.")
  flags.DEFINE_bool("copy", False, "register: copy the checkpoint into the registry.")
  flags.DEFINE_string("figures", "", "record-serving: a JSON file of serving figures.")
  flags.DEFINE_integer("max_new_tokens", 32, "measure: tokens generated per request.")
  flags.DEFINE_string("prompts_file", "", "measure: one prompt per line (default: built in).")
  flags.DEFINE_float("threshold", 0.5, "weaknesses: accuracy below this is weak.")
  flags.DEFINE_float("margin", 0.05, "weaknesses: a drop from the parent beyond this is weak.")
  flags.DEFINE_integer("min_n", 1, "weaknesses: skip cells with fewer examples.")
  flags.DEFINE_string("targeted_out", "", "weaknesses: write targeted training data here.")
  flags.DEFINE_integer("n_per_category", 256, "weaknesses: examples per weak cell.")
  flags.DEFINE_integer("seed", 0, "weaknesses: seed of the targeted data.")
  flags.DEFINE_enum("kind", "prompts", list(weakness.KINDS),
                    "weaknesses: RL prompt records or SFT dialogues.")
  flags.DEFINE_string("workdir", "", "weaknesses: the follow-up run's workdir.")
  flags.DEFINE_bool("start", False, "weaknesses: start the follow-up run.")
  flags.DEFINE_multi_string("follow_up_override", [],
                            "weaknesses: KEY=VALUE for the follow-up run's config (repeatable; "
                            "e.g. train.steps=100).")
  flags.DEFINE_string("role", "", "select: a JSON role profile.")


def _version_ref(reference: str) -> tuple[str, int]:
  name, sep, version = reference.partition(":")
  if not sep or not version.isdigit():
    raise RegistryError(f"expected NAME:VERSION, got {reference!r}")
  return name, int(version)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A plain-text table with aligned columns (floats to 3 decimals, None as '-')."""
  def cell(value: Any) -> str:
    if value is None:
      return "-"
    if isinstance(value, float):
      return f"{value:.3f}"
    return str(value)
  text = [[cell(v) for v in row] for row in rows]
  widths = [max([len(h)] + [len(r[i]) for r in text]) for i, h in enumerate(headers)]
  line = lambda values: "  ".join(v.ljust(w) for v, w in zip(values, widths)).rstrip()
  return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in text])


def list_table(versions: Sequence[ModelVersion]) -> str:
  """The `list` table."""
  rows = [[v.name, v.version, ",".join(v.stages) or "-", v.kind, v.created[:19], v.parent,
           v.objective or None, overall_accuracy(v.eval),
           (v.serving or {}).get("p95_latency_ms"), (v.serving or {}).get("tokens_per_s"),
           (v.serving or {}).get("peak_memory_mb")] for v in versions]
  return format_table(["model", "version", "stages", "kind", "created", "parent", "objective",
                       "accuracy", "p95 ms", "tok/s", "mem MB"], rows)


def eval_table(eval_record: dict[str, Any] | None) -> str:
  """Per-category rows of a recorded evaluation."""
  if not eval_record:
    return "(no evaluation recorded)"
  rows = [[r["task"], r["category"], r["difficulty"], r["accuracy"], r["n"]]
          for r in eval_record["rows"]]
  return format_table(["task", "category", "difficulty", "accuracy", "n"], rows)


def show(version: ModelVersion) -> str:
  """Everything the manifest records about a version."""
  lines = [f"{version.ref}" + (f"  ({', '.join(version.stages)})" if version.stages else "")]
  for key in ("checkpoint", "kind", "model_dir", "fingerprint", "created", "parent",
              "objective", "notes", "copied"):
    lines.append(f"  {key}: {getattr(version, key)}")
  lines.append(f"  tokenizer: {version.tokenizer or '(the bundled one)'}")
  lines.append(f"  data_sources: {', '.join(version.data_sources) or '-'}")
  lines.append(f"  config: {'recorded' if version.config else '-'}")
  accuracy = overall_accuracy(version.eval)
  lines += ["", "evaluation" + (f" (overall {accuracy:.3f}, {version.eval.get('source', '')})"
                                if accuracy is not None else ""), eval_table(version.eval)]
  serving = dict(version.serving or {})
  lines += ["", "serving", format_table(["figure", "value"], sorted(serving.items()))
            if serving else "(no serving figures recorded)"]
  return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Call:
  """One subcommand call: its arguments, the --config (and its file name) and the flags."""

  args: tuple[str, ...]
  config: Any = None
  config_name: str = ""
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def opt(self, name: str, default: Any = None) -> Any:
    """The flag `name` (`default` when not given or empty)."""
    value = self.options.get(name)
    return default if value is None or value == "" else value


def _list(reg: Registry, call: Call) -> str:
  versions = reg.list()
  return list_table(versions) if versions else f"(no models registered in {reg.root})"


def _show(reg: Registry, call: Call) -> str:
  return show(reg.resolve(call.args[0]))


def _compare(reg: Registry, call: Call) -> str:
  a, b = reg.resolve(call.args[0]), reg.resolve(call.args[1])
  rows = [[r.section, r.metric, r.a, r.b, r.delta] for r in reg.compare(a.ref, b.ref)]
  return format_table(["section", "metric", a.ref, b.ref, "delta"], rows)


def _promote(reg: Registry, call: Call) -> str:
  name, version = _version_ref(call.args[0])
  stage = call.opt("stage", "production")
  before = reg.stages(name).get(stage)
  reg.promote(name, version, stage)
  return f"{name}@{stage} -> {version}" + (f" (was {before})" if before else "")


def _register(reg: Registry, call: Call) -> str:
  if not call.opt("name") or not call.opt("checkpoint"):
    raise RegistryError("register needs --name and --checkpoint")
  version = reg.register(call.opt("name"), call.opt("checkpoint"), parent=call.opt("parent"),
                         config=call.config, data_sources=call.opt("data_sources", ()),
                         objective=call.opt("objective", ""), notes=call.opt("notes", ""),
                         copy=bool(call.opt("copy")))
  return f"registered {call.opt('name')}:{version}"


def _evaluate(reg: Registry, call: Call) -> str:
  version = reg.resolve(call.args[0])
  if call.config is None:
    raise RegistryError("evaluate needs --config (an RL config: eval prompts, rollout, reward)")
  result = tracking.evaluate_checkpoint_by_category(call.config, version.checkpoint)
  reg.record_eval(version.name, version.version, result, source=call.config_name)
  return (f"{version.ref}: overall {result['overall']['accuracy']:.3f} on "
          f"{result['overall']['n']} prompts (recorded)\n" + eval_table(result))


def _measure(reg: Registry, call: Call) -> str:
  version = reg.resolve(call.args[0])
  prompts = MEASURE_PROMPTS
  if call.opt("prompts_file"):
    lines = pathlib.Path(call.opt("prompts_file")).read_text(encoding="utf-8").splitlines()
    prompts = tuple(line for line in lines if line.strip())
  figures = tracking.measure_sampling(version.checkpoint, prompts,
                                      max_new_tokens=call.opt("max_new_tokens", 32),
                                      tokenizer_path=version.tokenizer)
  reg.record_serving(version.name, version.version, figures)
  return (f"{version.ref}: serving figures recorded ({figures['method']})\n"
          + format_table(["figure", "value"], sorted(figures.items())))


def _record_serving(reg: Registry, call: Call) -> str:
  version = reg.resolve(call.args[0])
  if not call.opt("figures"):
    raise RegistryError("record-serving needs --figures=FILE.json")
  figures = json.loads(pathlib.Path(call.opt("figures")).read_text())
  reg.record_serving(version.name, version.version, figures)
  return f"{version.ref}: serving figures recorded"


def _select(reg: Registry, call: Call) -> str:
  if not call.opt("role"):
    raise RegistryError("select needs --role=FILE.json")
  result = selection.select(reg, selection.RoleProfile.from_file(call.opt("role")))
  json_path, md_path = selection.write_selection(reg, result)
  headers, rows = selection.candidates_table(result)
  lines = [f"role: {result.profile.role}   selected: {result.selected or 'none'}", "",
           format_table(headers, rows) if rows else "(no candidate meets the requirements)"]
  if result.excluded:
    lines += ["", "excluded:"] + [f"  {line}" for line in selection.excluded_lines(result)]
  lines += ["", result.reasoning, "", f"wrote {json_path}", f"wrote {md_path}"]
  return "\n".join(lines)


def _weaknesses(reg: Registry, call: Call) -> str:
  version = reg.resolve(call.args[0])
  if not version.eval:
    raise RegistryError(f"{version.ref} has no recorded evaluation; run `evaluate` first")
  parent = reg.resolve(version.parent).eval if version.parent else None
  threshold, margin = call.opt("threshold", 0.5), call.opt("margin", 0.05)
  found = weakness.find_weaknesses(version.eval, parent, threshold, margin,
                                   min_n=call.opt("min_n", 1))
  lines = [f"{version.ref}: {len(found)} weakness(es) (threshold {threshold}, margin {margin}"
           + (f", parent {version.parent}" if version.parent else ", no parent") + ")"]
  lines += [f"  {w.describe(threshold, margin)}" for w in found]
  if not found or not call.opt("targeted_out"):
    return "\n".join(lines)
  summary = weakness.targeted_data(found, call.opt("targeted_out"),
                                   call.opt("n_per_category", 256), call.opt("seed", 0),
                                   kind=call.opt("kind", "prompts"))
  lines.append(f"wrote {summary['records']} {summary['kind']} records to {summary['path']}")
  if not call.config_name or not call.opt("workdir"):
    lines.append("(give --config and --workdir for the follow-up run's command)")
    return "\n".join(lines)
  command = weakness.follow_up_command(call.config_name, summary["path"],
                                       init_from=version.checkpoint, workdir=call.opt("workdir"),
                                       kind=summary["kind"],
                                       overrides=call.opt("follow_up_override", ()))
  lines += ["follow-up run:", "  " + weakness.shell_line(command),
            f"then: python -m wakea_jax.registry --registry={reg.root} register "
            f"--name={version.name} --checkpoint={call.opt('workdir')} --parent={version.ref} "
            f"--objective=targeted --data_sources={summary['path']}"]
  if call.opt("start"):
    print("\n".join(lines), flush=True)
    weakness.start_follow_up(command)
    lines = ["follow-up run finished"]
  return "\n".join(lines)


# command -> (number of positional arguments, function).
COMMANDS: dict[str, tuple[int, Callable[[Registry, Call], str]]] = {
    "list": (0, _list), "show": (1, _show), "compare": (2, _compare), "promote": (1, _promote),
    "register": (0, _register), "evaluate": (1, _evaluate), "measure": (1, _measure),
    "record-serving": (1, _record_serving), "weaknesses": (1, _weaknesses),
    "select": (0, _select),
}


def run(command: str, args: Sequence[str], *, registry: str, config: Any = None,
        config_name: str = "", **options: Any) -> str:
  """Runs one subcommand (see the module docstring) with flag values `options`; returns what
  it prints."""
  if not registry:
    raise RegistryError("--registry (or $WAKEA_REGISTRY) is required")
  if command not in COMMANDS:
    raise RegistryError(f"unknown command {command!r}; commands: {', '.join(COMMANDS)}")
  count, function = COMMANDS[command]
  if len(args) != count:
    raise RegistryError(f"{command} takes {count} argument(s), got {list(args)}")
  return function(Registry(registry), Call(tuple(args), config, config_name, options))


def main(argv: Sequence[str]) -> None:
  """Runs the subcommand in argv and prints its output."""
  if len(argv) < 2:
    raise app.UsageError(f"give a command: {', '.join(COMMANDS)}")
  logs.quiet_library_logs()
  config = FLAGS.config
  config_name = config_flags.get_config_filename(FLAGS["config"]) if config is not None else ""
  names = ("stage", "name", "checkpoint", "parent", "objective", "data_sources", "notes",
           "copy", "figures", "max_new_tokens", "prompts_file", "threshold", "margin", "min_n",
           "targeted_out", "n_per_category", "seed", "kind", "workdir", "start",
           "follow_up_override", "role")
  try:
    print(run(argv[1], argv[2:], registry=FLAGS.registry, config=config,
              config_name=config_name, **{n: FLAGS[n].value for n in names}))
  except (RegistryError, ValueError, FileNotFoundError) as e:
    sys.exit(f"registry {argv[1]}: {e}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
