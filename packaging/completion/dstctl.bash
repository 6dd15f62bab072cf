# bash completion for dstctl.  Verbs, options and live names (exports, volumes, arrays, layers,
# leg slots) come from `dstctl __complete`, which reads dstctl's own command tree and asks dstd
# (1 s at most; nothing when it is down).  Installed as
# /usr/share/bash-completion/completions/dstctl.
_dstctl() {
  local cur=${COMP_WORDS[COMP_CWORD]}
  local IFS=$'\n'
  local cands
  cands=$("${COMP_WORDS[0]}" __complete "${COMP_WORDS[@]:1:COMP_CWORD}" 2>/dev/null) || return 0
  COMPREPLY=($(compgen -W "$cands" -- "$cur"))
}
# -o default: paths (images, key files, mount points) when dstctl offers nothing.
complete -o default -F _dstctl dstctl
