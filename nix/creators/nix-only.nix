# sdImage.rootFilesystemCreator for an image that is /nix itself (an
# ephemeral root on tmpfs): store/, nix-path-registration and the
# populateRootCommands files at the image's top level. Mount it with
# fileSystems."/nix" = { device = "/dev/disk/by-label/NIXOS_SD"; fsType =
# "btrfs"; options = [ "compress-force=zstd" ]; neededForBoot = true; } and set
# sdImage.nixPathRegistrationFile = "/nix/nix-path-registration".
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
    mountpoint = "/nix";
    nixPathRegistrationFile = "/nix/nix-path-registration";
    compression = "zstd";
  }
  // args
)
