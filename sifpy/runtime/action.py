"""The action script: what runs first inside the container, as ``/bin/sh -c SCRIPT ACTION ARGS``.

It follows Apptainer's action-script algorithm (its
internal/pkg/util/fs/files/action_script.sh) in POSIX sh, so that it
works with any image shell (dash, busybox ash, bash): source ``/.singularity.d/env/*.sh``
in lexical order with the PATH fix-ups, inject ``--env``/``--env-file``/``SIFPYENV_``
values after ``99-base.sh``, apply the ``SING_USER_DEFINED_*PATH`` forms, restore host
variables that are still unset, drop the ``__SIFPY_*`` carriers, then exec the action.

The script only ever ``eval``s variable *names* (checked in Python) and, unless
``--no-eval``, injected values inside double quotes, exactly once, as Apptainer does.
``__SIFPY_ROOT`` (empty in a container) lets the fast tests run it against a directory.
"""

from __future__ import annotations

from sifpy.runtime.start import DEFAULT_PATH

ACTIONS = ("exec", "run", "shell", "test")

SCRIPT = r"""
__r="${__SIFPY_ROOT:-}"
# Some shells invent values for unset variables (bash: TERM, PATH); host names must start
# unset so that "still unset after the image scripts" below means what it says.
for __k in $__SIFPY_HOST_NAMES; do unset "$__k"; done
__sifpy_default_path() { [ -n "${PATH+x}" ] || PATH="@PATH@"; export PATH; }
__sifpy_fixpath() {
  for __d in @PATH_WORDS@; do
    case ":$PATH:" in *":$__d:"*) ;; *) PATH="$PATH:$__d" ;; esac
  done
  export PATH
}
__sifpy_inject() {
  __sifpy_injected=1
  __sifpy_default_path
  __sifpy_apply $__SIFPY_USER_NAMES
  if [ -n "${__SIFPY_ENV_FILE+x}" ]; then
    set -a; eval "$__SIFPY_ENV_FILE"; set +a
  fi
  __sifpy_apply $__SIFPY_LATE_NAMES
}
__sifpy_apply() {
  for __k in "$@"; do
    if [ -n "${__SIFPY_NO_EVAL:-}" ]; then
      eval "export $__k=\"\${__SIFPY_U_$__k}\""
    else
      eval "__v=\${__SIFPY_U_$__k}"
      eval "export $__k=\"$__v\""
    fi
    unset "__SIFPY_U_$__k"
    if [ "$__k" = LD_LIBRARY_PATH ]; then
      export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:/.singularity.d/libs"
    fi
  done
}
if [ -d "$__r/.singularity.d/env" ]; then
  for __f in "$__r"/.singularity.d/env/*.sh; do
    [ -f "$__f" ] || continue
    case "${__f##*/}" in
      90-environment.sh) __sifpy_default_path ;;
      99-runtimevars.sh) continue ;;
    esac
    . "$__f"
    case "${__f##*/}" in
      10-docker2singularity.sh|10-docker.sh) __sifpy_fixpath ;;
      99-base.sh) __sifpy_inject ;;
    esac
  done
elif [ -f "$__r/environment" ]; then
  . "$__r/environment"
fi
[ -n "${__sifpy_injected:-}" ] || __sifpy_inject
if [ -n "${SING_USER_DEFINED_PATH:-}" ]; then PATH="$SING_USER_DEFINED_PATH"; fi
if [ -n "${SING_USER_DEFINED_PREPEND_PATH:-}" ]; then
  PATH="$SING_USER_DEFINED_PREPEND_PATH:$PATH"
fi
if [ -n "${SING_USER_DEFINED_APPEND_PATH:-}" ]; then
  PATH="$PATH:$SING_USER_DEFINED_APPEND_PATH"
fi
export PATH
unset SING_USER_DEFINED_PATH SING_USER_DEFINED_PREPEND_PATH SING_USER_DEFINED_APPEND_PATH
for __k in $__SIFPY_HOST_NAMES; do
  eval "__set=\${$__k+x}"
  [ -n "$__set" ] || eval "export $__k=\"\${__SIFPY_H_$__k}\""
  unset "__SIFPY_H_$__k"
done
[ -n "${PS1:-}" ] || PS1="Sifpy> "
unset __SIFPY_HOST_NAMES __SIFPY_USER_NAMES __SIFPY_LATE_NAMES __SIFPY_NO_EVAL
unset __SIFPY_ENV_FILE __SIFPY_ROOT __r __f __k __v __d __set __sifpy_injected
case "$0" in
  exec)
    if ! command -v "$1" >/dev/null 2>&1; then
      echo "sifpy: can't execute: $1: not found" >&2; exit 127
    fi
    exec "$@" ;;
  run)
    if [ -n "${APPTAINER_APPNAME:-}" ]; then
      __s="/scif/apps/$APPTAINER_APPNAME/scif/runscript"
      if [ ! -f "$__s" ]; then
        echo "no app named $APPTAINER_APPNAME in this image" >&2; exit 127
      fi
    elif [ -f /.singularity.d/runscript ]; then __s=/.singularity.d/runscript
    elif [ -f /singularity ]; then __s=/singularity
    else echo "No runscript found in container, executing /bin/sh" >&2; exec /bin/sh "$@"
    fi
    if [ -x "$__s" ]; then exec "$__s" "$@"; else exec /bin/sh "$__s" "$@"; fi ;;
  test)
    if [ -n "${APPTAINER_APPNAME:-}" ]; then __s="/scif/apps/$APPTAINER_APPNAME/scif/test"
    else __s=/.singularity.d/test; fi
    [ -f "$__s" ] || exit 0
    if [ -x "$__s" ]; then exec "$__s" "$@"; else exec /bin/sh "$__s" "$@"; fi ;;
  shell)
    export PS1
    __s="${SINGULARITY_SHELL:-}"
    if [ -n "$__s" ] && [ -x "$__s" ]; then exec "$__s" "$@"
    elif [ -x /bin/bash ]; then exec /bin/bash --norc "$@"
    else exec /bin/sh "$@"; fi ;;
esac
echo "sifpy: unknown action $0" >&2
exit 125
""".replace("@PATH_WORDS@", DEFAULT_PATH.replace(":", " ")).replace("@PATH@", DEFAULT_PATH)


def action_argv(action: str, args: list[str], shell: str = "/bin/sh") -> list[str]:
    """The argv that runs ``action`` with ``args`` through the action script."""
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action}")
    return [shell, "-c", SCRIPT, action, *args]
