{
  description = "kvm-exit-lab: a KVM patch that answers CPUID 0x4FFFFFFF with the VM's exit count and exit cycles, and the nested lab that builds, boots and measures it";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.05";

  outputs = { self, nixpkgs }:
    let
      system = "x86_64-linux";
      pkgs = nixpkgs.legacyPackages.${system};
      inherit (pkgs) lib;

      # The kernel the patches target: nixpkgs' Linux 6.12 (the series was made on 6.12.117).
      linux = pkgs.linux_6_12;
      # The series, then the lab's workarounds for the emulated CPU (kernel/6.12/lab-patches).
      patchesIn = dir: map (name: dir + "/${name}")
        (lib.sort lib.lessThan
          (lib.filter (lib.hasSuffix ".patch")
            (builtins.attrNames (builtins.readDir dir))));
      kernelPatches = patchesIn ./kernel/6.12/patches ++ patchesIn ./kernel/6.12/lab-patches;

      # QEMU for x86 hosts only: runs L1, and is copied into L1 to run L2.
      qemu = pkgs.qemu_kvm;

      src = lib.fileset.toSource {
        root = ./.;
        fileset = lib.fileset.unions [
          ./Cargo.toml
          ./Cargo.lock
          ./proto
          ./guest
          ./labctl
          ./kernel
        ];
      };

      rustPackage = rustPlatform: pname: extra: rustPlatform.buildRustPackage ({
        inherit pname src;
        version = "0.1.0";
        cargoLock.lockFile = ./Cargo.lock;
        cargoBuildFlags = [ "-p" pname ];
        # The unit tests run in checks.unit-tests; the end-to-end tests boot VMs.
        doCheck = false;
      } // extra);

      labctl = rustPackage pkgs.rustPlatform "labctl" { };

      # Static (musl) guest programs: lab-init (PID 1 of both images), test_assignment2,
      # stress, boot-done. L1's init assembles L2's initramfs from them at run time.
      guest = rustPackage pkgs.pkgsStatic.rustPlatform "exitlab-guest" { };

      # tinyconfig + kernel/lab.config, as `labctl build` does; any option the fragment
      # asks for that olddefconfig drops fails the build (no ignoreConfigErrors).
      kernel = pkgs.stdenv.mkDerivation {
        pname = "linux-kvm-exit-lab";
        inherit (linux) version src;
        patches = kernelPatches;
        # rsync: `make headers_install` runs it (the selftest needs the UAPI headers).
        nativeBuildInputs = with pkgs; [ bc bison flex perl elfutils openssl python3 rsync ];
        # The phases are shell files (nix/kernel/), one copy that labctl/tests/flake.rs also
        # runs with only the programs these inputs provide (nix/debian-inputs.txt).
        labConfig = ./kernel/lab.config;
        postPatch = builtins.readFile ./nix/kernel/post-patch.sh;
        configurePhase = builtins.readFile ./nix/kernel/configure.sh;
        buildPhase = builtins.readFile ./nix/kernel/build.sh;
        installPhase = builtins.readFile ./nix/kernel/install.sh;
        meta.description = "Linux ${linux.version} with kernel/6.12/patches, configured as the lab's L1/L2 kernel";
      };

      # The L1 initramfs, assembled by labctl from the Nix-built pieces.
      labImage = pkgs.runCommand "kvm-exit-lab-l1-image"
        { nativeBuildInputs = [ labctl qemu pkgs.glibc.bin ]; }
        ''
          labctl build --accel tcg \
            --kernel ${kernel}/bzImage \
            --selftest ${kernel}/exit_stats_test \
            --guest-dir ${guest}/bin \
            --build-dir $out
          test -f $out/images/l1-base.cpio
        '';

      # `nix run .#lab`: labctl lab on the Nix-built artifacts, with Nix's QEMU.
      lab = pkgs.writeShellApplication {
        name = "kvm-exit-lab";
        runtimeInputs = [ labctl qemu ];
        text = ''
          exec labctl lab \
            --kernel ${kernel}/bzImage \
            --selftest ${kernel}/exit_stats_test \
            --l1-image ${labImage}/images/l1-base.cpio \
            --build-dir "''${XDG_CACHE_HOME:-$HOME/.cache}/kvm-exit-lab" \
            "$@"
        '';
      };
    in
    {
      packages.${system} = {
        inherit kernel labctl;
        guest-image = guest;
        lab-image = labImage;
        default = lab;
      };

      apps.${system} = {
        lab = {
          type = "app";
          program = "${lab}/bin/kvm-exit-lab";
        };
        default = self.apps.${system}.lab;
      };

      devShells.${system}.default = pkgs.mkShell {
        packages = with pkgs; [
          cargo rustc clippy rustfmt
          qemu
          gnumake gcc bc bison flex perl elfutils openssl patch xz rsync
          dejavu_fonts debootstrap e2fsprogs   # record-boot's plot and Debian guest
        ];
        # record-boot's plot reads DejaVu Sans from here (not /usr/share/fonts on NixOS).
        LABCTL_FONT_DIR = "${pkgs.dejavu_fonts}/share/fonts/truetype";
      };

      checks.${system}.unit-tests = labctl.overrideAttrs (old: {
        pname = "kvm-exit-lab-unit-tests";
        doCheck = true;
        cargoTestFlags = [ "--workspace" "--lib" "--bins" ];
      });
    };
}
