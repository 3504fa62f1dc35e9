# Sourced by the launch scripts: prints a command as a shell would read it back (like
# Python's shlex.join), for --dry_run output and remote command lines.
quote() {
  local out=() arg
  for arg in "$@"; do
    if [[ $arg =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
      out+=("$arg")
    else
      out+=("'${arg//\'/\'\\\'\'}'")
    fi
  done
  echo "${out[*]}"
}
