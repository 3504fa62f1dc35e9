r"""Renders launch/k8s/job.yaml (an Indexed Job + headless Service) and applies it.

  python launch/k8s/launch.py --name=sft --image=REGISTRY/wakea_jax:latest --hosts=4 \
      --gpus_per_host=8 -- python -m wakea_jax.train --config=configs/sft.py:quickstart \
      --workdir=gs://BUCKET/runs/sft
  python launch/k8s/launch.py --dry_run ...   # print the manifest and the kubectl command only

Every pod runs the same command. wakea_jax.parallel.distributed reads the coordinator
(JAX_COORDINATOR_ADDRESS = pod 0's stable DNS name), JAX_NUM_PROCESSES and the process id
(JOB_COMPLETION_INDEX, which Kubernetes sets in an Indexed Job). Standard library only, so it
runs wherever kubectl does.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import shlex
import string
import subprocess
import sys

TEMPLATE = pathlib.Path(__file__).with_name("job.yaml")


def render(*, name: str, image: str, hosts: int, command: list[str], port: int = 8476,
           gpus_per_host: int = 0) -> str:
  """The manifest text; `command` runs in every pod (JSON lists are valid YAML flow lists)."""
  if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,40}[a-z0-9])?", name):
    raise ValueError(f"--name={name!r} must be a lowercase DNS label of at most 42 characters")
  if hosts < 1:
    raise ValueError(f"--hosts={hosts} must be at least 1")
  if not command:
    raise ValueError("no command: give it after --")
  limits = {"nvidia.com/gpu": gpus_per_host} if gpus_per_host else {}
  return string.Template(TEMPLATE.read_text()).substitute(
      name=name, image=json.dumps(image), hosts=hosts, port=port, command=json.dumps(command),
      limits=json.dumps(limits))


def main(argv: list[str]) -> int:
  """Parses the flags, then prints or applies the manifest; returns the exit code."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--name", required=True, help="Job and Service name (a DNS label).")
  parser.add_argument("--image", required=True, help="Container image with wakea_jax installed.")
  parser.add_argument("--hosts", type=int, required=True, help="Number of pods (processes).")
  parser.add_argument("--port", type=int, default=8476, help="Coordinator port on pod 0.")
  parser.add_argument("--gpus_per_host", type=int, default=0, help="nvidia.com/gpu per pod.")
  parser.add_argument("--dry_run", action="store_true", help="Print instead of applying.")
  parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run.")
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  try:
    manifest = render(name=args.name, image=args.image, hosts=args.hosts, command=command,
                      port=args.port, gpus_per_host=args.gpus_per_host)
  except ValueError as e:
    parser.error(str(e))
  kubectl = ["kubectl", "apply", "-f", "-"]
  if args.dry_run:
    print(manifest, end="")
    print(f"# would run: {shlex.join(kubectl)}  (manifest on stdin)")
    return 0
  return subprocess.run(kubectl, input=manifest, text=True, check=False).returncode


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
