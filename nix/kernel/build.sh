runHook preBuild
# The UAPI headers first (the selftest needs them): `make headers_install` runs rsync,
# so a recipe that lacks it fails here, in seconds, not after the kernel.
make O=build headers_install INSTALL_HDR_PATH="$PWD/build/usr"
make O=build -j"$NIX_BUILD_CORES" bzImage
make -C tools/testing/selftests/kvm -j"$NIX_BUILD_CORES" \
  OUTPUT="$PWD/build/selftests" LINUX_HDR_PATH="$PWD/build/usr/include/" \
  "$PWD/build/selftests/x86_64/exit_stats_test"
runHook postBuild
