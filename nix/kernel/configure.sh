runHook preConfigure
make O=build tinyconfig
scripts/kconfig/merge_config.sh -m -O build build/.config "$labConfig"
make O=build olddefconfig
# Any option kernel/lab.config asks for that olddefconfig dropped fails the build.
dropped=0
while IFS= read -r opt; do
  case "$opt" in
    CONFIG_*=*)
      if ! grep -qxF "$opt" build/.config; then
        echo "kernel/lab.config: $opt did not survive olddefconfig" >&2
        dropped=1
      fi ;;
  esac
done < "$labConfig"
test "$dropped" = 0
runHook postConfigure
