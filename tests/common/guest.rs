//! A real guest kernel in QEMU: Debian's Linux 6.1 cloud kernel (unpacked by
//! `.ci/guest-kernel`), a busybox initramfs that loads the virtio and btrfs
//! modules, and a shell script run against the disk `/dev/vda`. Runs under
//! TCG (software emulation, about 15 s); `BTRFSIMG_GUEST_KVM=1` uses KVM.

#![allow(unused_imports, dead_code)]

use super::*;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Where `.ci/guest-kernel` unpacks the kernel package (or `$BTRFSIMG_GUEST_KERNEL`).
pub const GUEST_KERNEL_ENV: &str = "BTRFSIMG_GUEST_KERNEL";
pub const DEFAULT_GUEST_KERNEL: &str = "/var/cache/btrfsimg/linux-6.1";
/// The oldest kernel btrfsimg's default images are for: bullseye's 5.10.
pub const GUEST_KERNEL_5_10_ENV: &str = "BTRFSIMG_GUEST_KERNEL_5_10";
pub const DEFAULT_GUEST_KERNEL_5_10: &str = "/var/cache/btrfsimg/linux-5.10";

const BEGIN: &str = "BTRFSIMG-GUEST-BEGIN";
const END: &str = "BTRFSIMG-GUEST-END";

pub struct Guest {
    vmlinuz: PathBuf,
    /// `lib/modules/<version>` of the unpacked package.
    modules: PathBuf,
}

/// The Linux 6.1 guest kernel, or a loud skip (a failure under REQUIRE)
/// saying how to get it.
pub fn guest_available(what: &str) -> Option<Guest> {
    guest_kernel(
        what,
        GUEST_KERNEL_ENV,
        DEFAULT_GUEST_KERNEL,
        "6.",
        ".ci/guest-kernel",
    )
}

/// The Linux 5.10 guest kernel (bullseye's), likewise.
pub fn guest_5_10_available(what: &str) -> Option<Guest> {
    guest_kernel(
        what,
        GUEST_KERNEL_5_10_ENV,
        DEFAULT_GUEST_KERNEL_5_10,
        "5.10.",
        ".ci/guest-kernel /var/cache/btrfsimg/linux-5.10 bullseye",
    )
}

fn guest_kernel(what: &str, env: &str, default: &str, version: &str, how: &str) -> Option<Guest> {
    if !tools_available(what, &["qemu-system-x86_64", "busybox", "modinfo"]) {
        return None;
    }
    let root = PathBuf::from(std::env::var(env).unwrap_or_else(|_| default.to_string()));
    let find = |dir: &Path, prefix: &str| {
        fs::read_dir(dir).ok().and_then(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(prefix))
                })
                .max()
        })
    };
    let vmlinuz = find(&root.join("boot"), "vmlinuz-");
    let modules = find(&root.join("lib/modules"), version);
    match (vmlinuz, modules) {
        (Some(vmlinuz), Some(modules)) => Some(Guest { vmlinuz, modules }),
        _ => {
            skip_or_panic(
                what,
                &format!(
                    "no Linux {version}x guest kernel in {} (run {how}, or set {env})",
                    root.display()
                ),
            );
            None
        }
    }
}

impl Guest {
    /// Module files by name (`-` and `_` are the same in module names).
    fn module_index(&self) -> BTreeMap<String, PathBuf> {
        let mut out = BTreeMap::new();
        let mut stack = vec![self.modules.join("kernel")];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if let Some(n) = p.file_name().and_then(|n| n.to_str()) {
                    if let Some(name) = n.strip_suffix(".ko") {
                        out.insert(name.replace('-', "_"), p.clone());
                    }
                }
            }
        }
        out
    }

    /// The modules for `wanted` and everything they depend on, dependencies first.
    fn load_order(&self, wanted: &[&str]) -> Vec<PathBuf> {
        let index = self.module_index();
        let mut order = Vec::new();
        let mut done = BTreeSet::new();
        fn visit(
            name: &str,
            index: &BTreeMap<String, PathBuf>,
            done: &mut BTreeSet<String>,
            order: &mut Vec<PathBuf>,
        ) {
            let name = name.replace('-', "_");
            if !done.insert(name.clone()) {
                return;
            }
            // Built into the kernel: nothing to load.
            let Some(path) = index.get(&name) else { return };
            let deps = run_stdout(
                Command::new(tool("modinfo"))
                    .args(["-F", "depends"])
                    .arg(path),
            );
            for d in deps.trim().split(',').filter(|d| !d.is_empty()) {
                visit(d, index, done, order);
            }
            order.push(path.clone());
        }
        for w in wanted {
            visit(w, &index, &mut done, &mut order);
        }
        order
    }

    /// Builds an initramfs running `script` (busybox sh, with `/dev/vda` the
    /// disk and /mnt an empty directory), returns the initramfs path.
    fn initramfs(&self, dir: &Path, script: &str) -> PathBuf {
        let root = dir.join("initramfs");
        for d in ["bin", "dev", "proc", "sys", "mnt", "tmp", "lib/modules"] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        fs::copy(tool("busybox"), root.join("bin/busybox")).unwrap();
        let mut loads = String::new();
        // The checksum algorithms' crypto modules too (built in where absent).
        for m in self.load_order(&[
            "virtio_pci",
            "virtio_blk",
            "btrfs",
            "xxhash_generic",
            "blake2b_generic",
        ]) {
            let name = m.file_name().unwrap();
            fs::copy(&m, root.join("lib/modules").join(name)).unwrap();
            loads.push_str(&format!(
                "insmod /lib/modules/{} || echo insmod failed: {}\n",
                name.to_string_lossy(),
                name.to_string_lossy()
            ));
        }
        let init = format!(
            "#!/bin/busybox sh\n\
             /bin/busybox --install -s /bin\n\
             mount -t proc proc /proc\n\
             mount -t sysfs sys /sys\n\
             mount -t devtmpfs dev /dev\n\
             {loads}\
             for i in $(seq 50); do [ -b /dev/vda ] && break; sleep 0.1; done\n\
             echo {BEGIN}\n\
             {script}\n\
             echo {END} $?\n\
             poweroff -f\n"
        );
        fs::write(root.join("init"), init).unwrap();
        fs::set_permissions(root.join("init"), fs::Permissions::from_mode(0o755)).unwrap();
        let cpio = dir.join("initramfs.cpio");
        let list = run_stdout(
            Command::new(tool("busybox"))
                .args(["find", "."])
                .current_dir(&root),
        );
        let out = fs::File::create(&cpio).unwrap();
        let mut child = Command::new(tool("busybox"))
            .args(["cpio", "-o", "-H", "newc"])
            .current_dir(&root)
            .stdin(Stdio::piped())
            .stdout(out)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(list.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success(), "cpio failed");
        cpio
    }

    /// Boots the guest with `drive` (a QEMU -drive specification, e.g.
    /// `file=IMG,format=raw,readonly=on,cache=none`) as a virtio disk, runs
    /// `script`, and returns what it printed. Panics if the script fails or
    /// the guest does not finish within `timeout`.
    pub fn run(&self, drive: &str, script: &str, timeout: Duration) -> String {
        let work = workdir("guest");
        let initrd = self.initramfs(work.path(), script);
        let serial = work.path().join("serial.log");
        // TCG by default: a nested /dev/kvm can exist and still hang.
        let kvm = std::env::var("BTRFSIMG_GUEST_KVM").as_deref() == Ok("1");
        let mut cmd = Command::new(tool("qemu-system-x86_64"));
        if kvm {
            cmd.args(["-accel", "kvm"]);
        }
        cmd.args(["-accel", "tcg", "-m", "512", "-smp", "1"])
            .args(["-display", "none", "-monitor", "none", "-no-reboot"])
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .arg("-kernel")
            .arg(&self.vmlinuz)
            .arg("-initrd")
            .arg(&initrd)
            .args(["-append", "console=ttyS0 panic=-1 loglevel=4"])
            .arg("-drive")
            .arg(format!("{drive},if=virtio"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start qemu");
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let log = fs::read_to_string(&serial).unwrap_or_default();
                panic!("the guest did not finish within {timeout:?}; console:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let mut err = String::new();
        use std::io::Read;
        let _ = child.stderr.take().unwrap().read_to_string(&mut err);
        let log = fs::read_to_string(&serial).unwrap_or_default();
        assert!(
            status.success(),
            "qemu failed ({status}): {err}\nconsole:\n{log}"
        );
        let body = log
            .split_once(BEGIN)
            .and_then(|(_, rest)| rest.split_once(END))
            .unwrap_or_else(|| panic!("the guest script did not run to the end; console:\n{log}"));
        assert!(
            !log.contains("insmod failed"),
            "a module did not load; console:\n{log}"
        );
        let code = body.1.split_whitespace().next().unwrap_or("?");
        assert_eq!(code, "0", "the guest script failed; console:\n{log}");
        body.0.replace('\r', "")
    }
}

/// `ls -l`-style permission string of a mode (what busybox `stat -c %A` prints).
pub fn mode_string(mode: u32) -> String {
    let ty = match mode & libc::S_IFMT {
        libc::S_IFDIR => 'd',
        libc::S_IFLNK => 'l',
        libc::S_IFIFO => 'p',
        libc::S_IFSOCK => 's',
        libc::S_IFCHR => 'c',
        libc::S_IFBLK => 'b',
        _ => '-',
    };
    let mut s = String::from(ty);
    for (shift, special, lower, upper) in [
        (6, 0o4000, 's', 'S'),
        (3, 0o2000, 's', 'S'),
        (0, 0o1000, 't', 'T'),
    ] {
        let bits = (mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(match (mode & special != 0, bits & 1 != 0) {
            (true, true) => lower,
            (true, false) => upper,
            (false, true) => 'x',
            (false, false) => '-',
        });
    }
    s
}

/// The guest script that mounts `/dev/vda` read-only and prints every entry
/// (`stat -c '%A %u %g %s %N'`) and every regular file's sha256.
pub const LIST_AND_HASH: &str = "mount -t btrfs -o ro /dev/vda /mnt || exit 1\n\
     cd /mnt\n\
     find . -mindepth 1 -exec stat -c 'S %A %u %g %s %N' {} + || exit 1\n\
     find . -type f -exec sha256sum {} + || exit 1\n\
     cd /\n\
     umount /mnt";

/// What `LIST_AND_HASH` prints for the tree at `src`, as sorted lines
/// (directory sizes left out: they are filesystem-specific).
pub fn expected_listing(src: &Path) -> Vec<String> {
    use sha2::{Digest, Sha256};
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::from(".")];
    while let Some(rel) = stack.pop() {
        for e in fs::read_dir(src.join(&rel)).unwrap().flatten() {
            let r = rel.join(e.file_name());
            let m = fs::symlink_metadata(src.join(&r)).unwrap();
            let name = r.display().to_string();
            let shown = if m.file_type().is_symlink() {
                let t = fs::read_link(src.join(&r)).unwrap();
                format!("'{name}' -> '{}'", t.display())
            } else {
                name.clone()
            };
            let size = if m.is_file() || m.file_type().is_symlink() {
                m.len().to_string()
            } else {
                "-".into()
            };
            out.push(format!(
                "S {} {} {} {size} {shown}",
                mode_string(m.mode()),
                m.uid(),
                m.gid()
            ));
            if m.is_dir() {
                stack.push(r);
            } else if m.is_file() {
                let h = Sha256::digest(fs::read(src.join(&r)).unwrap());
                let hex: String = h.iter().map(|b| format!("{b:02x}")).collect();
                out.push(format!("{hex}  {name}"));
            }
        }
    }
    out.sort();
    out
}

/// The guest's listing as `expected_listing` shapes it.
pub fn guest_listing(output: &str) -> Vec<String> {
    let mut out: Vec<String> = output
        .lines()
        .filter(|l| l.starts_with("S ") || l.len() > 66 && l.as_bytes()[64] == b' ')
        .map(|l| {
            let f: Vec<&str> = l.splitn(6, ' ').collect();
            if f[0] == "S" && !f[1].starts_with(['-', 'l']) {
                format!("S {} {} {} - {}", f[1], f[2], f[3], f[5])
            } else {
                l.to_string()
            }
        })
        .collect();
    out.sort();
    out
}
