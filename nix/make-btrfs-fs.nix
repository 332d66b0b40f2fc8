# A btrfs image holding the closure of `storePaths` in /nix/store, the
# closure's registration at /nix-path-registration and the contents of a
# ./files directory filled by `populateImageCommands`, sized to its content.
#
# It takes the arguments of nixpkgs' nixos/lib/make-btrfs-fs.nix, so it can be
# used as `sdImage.rootFilesystemCreator`, but builds the image with
# `btrfsimg export` straight from the store: no staging copy of the closure,
# no fakeroot (every inode is owned by 0:0), no faketime (every time the
# image records is fixed), the same bytes on every build.
#
# The result is the image file itself: btrfs-fs.img, or btrfs-fs.img.zst
# when `compressImage` is set; its `layout` output is the image's layout
# record. Keep that record beside the deployed image and pass it as
# `baseLayout` to the next build: files unchanged since keep their blocks,
# so a block-based update (RAUC, casync, bmap, zstd --patch-from) sends
# little more than what changed.
{
  pkgs,
  lib,
  # Derivations whose closure goes into the image's /nix/store.
  storePaths,
  # Compress the image file with zstd.
  compressImage ? false,
  # Compress file data inside the filesystem, as mkfs.btrfs --compress spells
  # it: "zstd", "zstd:LEVEL" (1-15), "zlib", "zlib:LEVEL" (1-9), "lzo" or null.
  compression ? null,
  # Subvolumes, as `btrfsimg --subvol` spells them: "PATH" (a directory of
  # the image), "ro:PATH", "default:PATH", or the mount-view form
  # "default:@=/" "@nix=/nix" (the subvolume holds what the booted system
  # sees under the mountpoint).
  subvolumes ? [ ],
  # Where the booted system mounts the image, e.g. "/nix" for an image that
  # is /nix itself (ephemeral root): store paths then land at store/...
  mountpoint ? null,
  # Where the closure's registration goes, as a path of the booted system
  # (sdImage.nixPathRegistrationFile); null: /nix-path-registration.
  nixPathRegistrationFile ? null,
  # Checksum algorithm: "crc32c" (default), "xxhash", "sha256", "blake2".
  csum ? null,
  zstd,
  # Shell commands that populate the ./files directory; its contents are
  # merged into the root of the image.
  populateImageCommands ? "",
  volumeLabel,
  uuid ? "44444444-4444-4444-8888-888888888888",
  btrfs-progs,
  # The image builder; an overlay's pkgs.btrfsimg takes precedence.
  btrfsimg ? pkgs.buildPackages.callPackage ./package.nix { },
  # The layout record (the `layout` output) of the image this one updates:
  # a path, or a previous build's `.layout`. It must come from the same
  # options (compression, checksum); null: a fresh layout.
  baseLayout ? null,
  # Run `btrfs check` on the finished image (a compressed one is decompressed
  # to a temporary file for it).
  checkImage ? true,
  # nixpkgs' version also takes libfaketime and fakeroot; they are not needed.
  ...
}:

let
  closureInfo = pkgs.buildPackages.closureInfo { rootPaths = storePaths; };
in
pkgs.stdenv.mkDerivation {
  name = "btrfs-fs.img${lib.optionalString compressImage ".zst"}";
  outputs = [
    "out"
    "layout"
  ];

  nativeBuildInputs = [
    btrfsimg
    btrfs-progs
  ] ++ lib.optional compressImage zstd;

  buildCommand = ''
    (
      mkdir -p ./files
      ${populateImageCommands}
    )

    # The files were just made: give them the store's mtime so the build's
    # clock does not reach the image.
    find ./files -exec touch -h -d @1 {} +

    threads=''${NIX_BUILD_CORES:-1}
    if [ "$threads" -lt 1 ]; then threads=1; fi

    btrfsimg export \
      --closure-info ${closureInfo} \
      --files ./files \
      --owner 0:0 \
      --timestamp 1 \
      --label ${lib.escapeShellArg volumeLabel} \
      --uuid ${lib.escapeShellArg uuid} \
      ${lib.optionalString compressImage ''--zstd''} \
      ${lib.optionalString (compression != null) "--compress ${lib.escapeShellArg compression}"} \
      ${lib.concatMapStringsSep " " (v: "--subvol ${lib.escapeShellArg v}") subvolumes} \
      ${lib.optionalString (mountpoint != null) "--mountpoint ${lib.escapeShellArg mountpoint}"} \
      ${lib.optionalString (nixPathRegistrationFile != null) "--registration-path ${lib.escapeShellArg nixPathRegistrationFile}"} \
      ${lib.optionalString (csum != null) "--csum ${lib.escapeShellArg csum}"} \
      ${lib.optionalString (baseLayout != null) "--base-layout ${lib.escapeShellArg "${baseLayout}"}"} \
      --write-layout "$layout" \
      --threads "$threads" \
      --quiet \
      -o "$out"

    ${lib.optionalString checkImage (
      if compressImage then
        ''
          zstd -d --no-progress "$out" -o ./check.img
          btrfs check --readonly ./check.img
          rm ./check.img
        ''
      else
        ''
          btrfs check --readonly "$out"
        ''
    )}
  '';
}
