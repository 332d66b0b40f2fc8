{
  description = "btrfsimg: exact btrfs filesystem images, computed and served without writing them out";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      packages = forAllSystems (pkgs: rec {
        btrfsimg = pkgs.callPackage ./nix/package.nix { };
        default = btrfsimg;
      });

      # pkgs.btrfsimg, which make-btrfs-fs.nix then takes.
      overlays.default = final: prev: {
        btrfsimg = final.callPackage ./nix/package.nix { };
      };

      # Files for sdImage.rootFilesystemCreator: the image of the closure
      # (nixpkgs' make-btrfs-fs.nix arguments), the @/@nix/@home layout, and
      # an image that is /nix itself.
      lib.rootFilesystemCreators = {
        default = ./nix/make-btrfs-fs.nix;
        subvolumes = ./nix/creators/subvolumes.nix;
        nixOnly = ./nix/creators/nix-only.nix;
      };
    };
}
