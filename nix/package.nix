# btrfsimg as a Nix package:
#   pkgs.callPackage ./nix/package.nix { }
{
  lib,
  rustPlatform,
}:

let
  manifest = lib.importTOML ../Cargo.toml;
in
rustPlatform.buildRustPackage {
  pname = manifest.package.name;
  inherit (manifest.package) version;

  # The repository without .git, result links and a local cargo target/ tree.
  src = lib.cleanSourceWith {
    name = "btrfsimg-source";
    src = lib.cleanSource ../.;
    filter = path: type: !(type == "directory" && baseNameOf path == "target");
  };

  cargoLock.lockFile = ../Cargo.lock;

  # The test suite needs root, loop devices and a btrfs-capable kernel,
  # none of which a Nix build sandbox has; run it with `cargo test --release`.
  doCheck = false;

  meta = {
    inherit (manifest.package) description;
    license = with lib.licenses; [
      mit
      asl20
    ];
    mainProgram = "btrfsimg";
    platforms = lib.platforms.linux;
  };
}
