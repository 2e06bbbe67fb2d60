install -Dm644 build/arch/x86/boot/bzImage "$out/bzImage"
install -Dm755 build/selftests/x86_64/exit_stats_test "$out/exit_stats_test"
install -Dm644 build/.config "$out/config"
