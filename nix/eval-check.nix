# Evaluates flake.nix's outputs without nixpkgs (nix-instantiate --eval --strict), against
# a stand-in that has only the nixpkgs attributes the flake may use, each taking only the
# arguments nixpkgs' own takes. A misspelled attribute, an argument nixpkgs does not know,
# a phase file or patch directory that is not there: evaluation fails. What it does not
# prove: that nixpkgs' functions build what they are given (labctl/tests/flake.rs runs the
# kernel recipe for that), nor that the attributes exist at the pinned revision (checked
# by hand against nixpkgs' sources, see README).
{ flake ? ../flake.nix }:
let
  flake' = import flake;

  # Builds a fake derivation after checking its arguments' names.
  drv = kind: allowed: args:
    let unknown = builtins.filter (n: !(builtins.elem n allowed)) (builtins.attrNames args);
    in
    if unknown != [ ] then throw "${kind}: arguments nixpkgs does not take: ${toString unknown}"
    else args // {
      type = "derivation";
      outPath = "/nix/store/00000000000000000000000000000000-${args.pname or args.name or kind}";
      overrideAttrs = f: drv kind allowed (args // f args);
    };

  # Arguments of the phases and attributes every mkDerivation accepts, and the ones the
  # flake sets as environment variables (labConfig).
  mkDerivationArgs = [
    "pname" "version" "src" "patches" "nativeBuildInputs" "buildInputs" "postPatch"
    "configurePhase" "buildPhase" "installPhase" "meta" "labConfig"
  ];
  rustArgs = [
    "pname" "version" "src" "cargoLock" "cargoBuildFlags" "cargoTestFlags" "doCheck" "meta"
  ];

  hasSuffix = suffix: s:
    let ls = builtins.stringLength s; lx = builtins.stringLength suffix;
    in ls >= lx && builtins.substring (ls - lx) lx s == suffix;

  lib = {
    sort = builtins.sort;
    lessThan = builtins.lessThan;
    filter = builtins.filter;
    inherit hasSuffix;
    fileset = {
      unions = paths: map (p: if builtins.pathExists p then p else throw "fileset: ${toString p} does not exist") paths;
      toSource = { root, fileset }: builtins.seq (builtins.deepSeq fileset null) root;
    };
  };

  tool = name: drv "tool" [ "name" ] { inherit name; };
  tools = names: builtins.listToAttrs (map (n: { name = n; value = tool n; }) names);

  rustPlatform = {
    buildRustPackage = drv "buildRustPackage" rustArgs;
  };

  pkgs = tools [
    "bc" "bison" "flex" "perl" "elfutils" "openssl" "python3" "rsync" "cargo" "rustc"
    "clippy" "rustfmt" "gnumake" "gcc" "patch" "xz" "dejavu_fonts" "debootstrap"
    "e2fsprogs"
  ] // {
    inherit lib rustPlatform;
    pkgsStatic = { inherit rustPlatform; };
    linux_6_12 = { version = "6.12.0"; src = "/nix/store/linux-src"; };
    qemu_kvm = tool "qemu";
    glibc = { bin = tool "glibc-bin"; };
    stdenv = { mkDerivation = drv "mkDerivation" mkDerivationArgs; };
    runCommand = name: env: script:
      builtins.seq (drv "runCommand" [ "nativeBuildInputs" ] env)
        (drv "runCommand" [ "name" "script" ] { inherit name script; });
    writeShellApplication = drv "writeShellApplication" [ "name" "runtimeInputs" "text" ];
    mkShell = drv "mkShell" [ "packages" "LABCTL_FONT_DIR" ];
  };

  nixpkgs = { legacyPackages.x86_64-linux = pkgs; };
  self = outputs;
  outputs = flake'.outputs { inherit self nixpkgs; };
  system = "x86_64-linux";
in
# Every output, forced to the bottom (what is not in the answer below is evaluated too).
builtins.deepSeq outputs {
  packages = builtins.attrNames outputs.packages.${system};
  apps = builtins.attrNames outputs.apps.${system};
  program = outputs.apps.${system}.lab.program;
  kernel = {
    inherit (outputs.packages.${system}.kernel) pname configurePhase buildPhase installPhase postPatch;
    patches = map toString outputs.packages.${system}.kernel.patches;
    inputs = map (t: t.name) outputs.packages.${system}.kernel.nativeBuildInputs;
  };
  checks = builtins.attrNames outputs.checks.${system};
  devShell = map (t: t.name or "?") outputs.devShells.${system}.default.packages;
  lab = outputs.packages.${system}.default.text;
}
