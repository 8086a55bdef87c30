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

ACTIONS = ("exec", "run", "shell", "test", "start")

SCRIPT = r"""
__r="${__SIFPY_ROOT:-}"
# Apptainer's interpreter defines $UID, which injected values may use (APPTAINERENV_X=$UID);
# dash and busybox ash don't. Not exported, as there.
[ -n "${UID+x}" ] || [ -z "${__SIFPY_UID:-}" ] || UID=$__SIFPY_UID
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
  __sifpy_apply U $__SIFPY_USER_NAMES
  if [ -n "${__SIFPY_ENV_FILE+x}" ]; then
    __sifpy_env_file
    __sifpy_apply F $__SIFPY_FILE_SET
  fi
  __sifpy_apply U $__SIFPY_LATE_NAMES
}
__sifpy_apply() {
  __p=$1; shift
  for __k in "$@"; do
    if [ -n "${__SIFPY_NO_EVAL:-}" ]; then
      eval "export $__k=\"\${__SIFPY_${__p}_$__k}\""
    else
      eval "__v=\${__SIFPY_${__p}_$__k}"
      eval "export $__k=\"$__v\""
    fi
    unset "__SIFPY_${__p}_$__k"
  done
}
# Print $1 as one single-quoted shell word; unless --no-eval, with each " escaped first,
# ready for __sifpy_apply's evaluation (Apptainer's shell.EscapeDoubleQuotes).
__sifpy_quote() {
  __s=$1; __o=
  if [ -z "${__SIFPY_NO_EVAL:-}" ]; then
    while :; do
      case $__s in *"$__dq"*) ;; *) break ;; esac
      __a=${__s%%"$__dq"*}; __o=$__o$__a'\"'; __s=${__s#*"$__dq"}
    done
    __s=$__o$__s; __o=
  fi
  while :; do
    case $__s in *"$__sq"*) ;; *) break ;; esac
    __a=${__s%%"$__sq"*}; __o=$__o$__a"'\\''"; __s=${__s#*"$__sq"}
  done
  printf "'%s'" "$__o$__s"
}
# Apptainer's set_default_ld_library_path: when LD_LIBRARY_PATH is only the libs dir (from
# 99-base.sh) and that dir holds something (bound GPU libraries), or a PREPEND_/APPEND_ form
# is given, the image's own library directories (its ldconfig's list) go first, so the
# bound libraries don't hide the image's.
__sifpy_default_ld() {
  [ "${LD_LIBRARY_PATH:-}" = /.singularity.d/libs ] || return 0
  # The libs dir's first entry, if any (a glob, not a $(...) subshell: a fork is ~1 ms).
  __l='*'
  if [ -d "$__r/.singularity.d/libs" ]; then
    for __l in "$__r/.singularity.d/libs/"*; do break; done
    [ "$__l" != "$__r/.singularity.d/libs/*" ] || __l='*'
  fi
  if [ "$__l" = '*' ] && [ -z "${PREPEND_LD_LIBRARY_PATH:-}" ] &&
    [ -z "${APPEND_LD_LIBRARY_PATH:-}" ]; then
    return 0
  fi
  [ -x /sbin/ldconfig ] || return 0
  __tab=$(printf '\t'); __j=
  for __d in $(/sbin/ldconfig -Nv 2>/dev/null | while IFS= read -r __line; do
      case $__line in "$__tab"*) ;; *) printf '%s\n' "${__line%%:*}" ;; esac
    done); do
    __j="$__j$__d:"
  done
  [ -z "$__j" ] || export LD_LIBRARY_PATH="$__j$LD_LIBRARY_PATH"
}
# Apptainer evaluates the env file first, then injects each variable it set as if given
# by APPTAINERENV_: evaluated again, PATH forms, LD_LIBRARY_PATH ending in the libs dir.
# The first evaluation runs in a subshell (its other effects stay there), which prints
# __SIFPY_F_<name>='value' for each variable the file changed.
__sifpy_env_file() {
  __dq='"'; __sq="'"
  __out=$(
    for __k in $__SIFPY_FILE_NAMES; do eval "__b_$__k=\${$__k-__sifpy_unset}"; done
    set -a
    eval "$__SIFPY_ENV_FILE" >&2
    set +a
    for __k in $__SIFPY_FILE_NAMES; do
      eval "__set=\${$__k+x} __v=\${$__k-} __b=\${__b_$__k}"
      [ -n "$__set" ] && [ "$__v" != "$__b" ] || continue
      case $__k in
        PATH|PREPEND_PATH|APPEND_PATH) __t=SING_USER_DEFINED_$__k ;;
        LD_LIBRARY_PATH) __t=$__k; [ -z "$__v" ] || __v="$__v:/.singularity.d/libs" ;;
        *) __t=$__k ;;
      esac
      printf '__SIFPY_F_%s=' "$__t"; __sifpy_quote "$__v"
      printf '\n__SIFPY_FILE_SET="$__SIFPY_FILE_SET %s"\n' "$__t"
    done
    echo :
  )
  eval "$__out"
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
      99-base.sh) __sifpy_inject; __sifpy_default_ld ;;
    esac
  done
elif [ -f "$__r/environment" ]; then
  . "$__r/environment"
  __sifpy_fixpath
  __sifpy_inject
  __sifpy_default_ld
fi
[ -n "${__sifpy_injected:-}" ] || __sifpy_inject
if [ -n "${LD_LIBRARY_PATH:-}" ]; then
  __l=$LD_LIBRARY_PATH
  [ -z "${PREPEND_LD_LIBRARY_PATH:-}" ] || __l="$PREPEND_LD_LIBRARY_PATH:$__l"
  [ -z "${APPEND_LD_LIBRARY_PATH:-}" ] || __l="$__l:$APPEND_LD_LIBRARY_PATH"
  LD_LIBRARY_PATH=$__l
fi
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
unset __SIFPY_HOST_NAMES __SIFPY_USER_NAMES __SIFPY_LATE_NAMES __SIFPY_NO_EVAL __SIFPY_UID
unset __SIFPY_ENV_FILE __SIFPY_FILE_NAMES __SIFPY_FILE_SET __SIFPY_ROOT
unset __r __f __k __v __d __set __sifpy_injected __p __out __dq __sq __l __j __tab __line
case "$0" in
  exec)
    # A redirection, not $(...): a subshell is a fork (~1.5 ms of every start). With
    # --no-mount dev there is no /dev/null to redirect to, and the subshell it is.
    if [ -c /dev/null ]; then
      command -v "$1" >/dev/null 2>&1 || __nf=1
    else
      [ -n "$(command -v "$1")" ] || __nf=1
    fi
    if [ -n "${__nf:-}" ]; then
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
    # Apptainer's words and statuses: no test in the image is a success (said on
    # stdout, as the test script Apptainer writes into its images does), none in the app
    # a failure (an error, on stderr).
    if [ -n "${APPTAINER_APPNAME:-}" ]; then
      __s="/scif/apps/$APPTAINER_APPNAME/scif/test"
      [ -f "$__s" ] || { echo "No tests for contained app: $APPTAINER_APPNAME" >&2; exit 1; }
    elif [ -f /.singularity.d/test ]; then __s=/.singularity.d/test
    else echo "No test found in container, executing /bin/sh -c true"; exec /bin/sh -c true
    fi
    if [ -x "$__s" ]; then exec "$__s" "$@"; else exec /bin/sh "$__s" "$@"; fi ;;
  start)
    __s=/.singularity.d/startscript
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
