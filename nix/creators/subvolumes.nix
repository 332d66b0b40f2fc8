# sdImage.rootFilesystemCreator for the usual btrfs layout: `@` (the
# default subvolume) at /, `@nix` at /nix, `@home` at /home, the closure's
# registration at /nix/nix-path-registration (set
# sdImage.nixPathRegistrationFile to the same path). Mount with
# fileSystems."/".options = [ "subvol=@" ], "/nix" with "subvol=@nix", ...
#
# callPackage passes what the formals below name (so pkgs, lib and the tools
# reach make-btrfs-fs.nix, and pkgs.btrfsimg when an overlay provides it).
{
  pkgs,
  lib,
  zstd,
  btrfs-progs,
  btrfsimg ? null,
  ...
}@args:
import ../make-btrfs-fs.nix (
  {
    subvolumes = [
      "default:@=/"
      "@nix=/nix"
      "@home=/home"
    ];
    nixPathRegistrationFile = "/nix/nix-path-registration";
    compression = "zstd";
  }
  // args
)
