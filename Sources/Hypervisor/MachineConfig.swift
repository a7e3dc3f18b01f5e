// Hypervisor — runs QEMU microVMs and drives them over QMP. It knows files by path only:
// nothing here knows of the store, the mount or HTTP. VMService (above) decides which store
// files become a machine's RAM and disks, and when to snapshot and restore.
import Foundation
import FurcateCore

/// How guest code runs: hardware virtualization or QEMU's binary translator.
public enum Accelerator: String, Sendable, Codable {
    case kvm, tcg

    /// KVM when the CPU advertises vmx/svm and /dev/kvm opens; TCG otherwise.
    /// `FURCATE_ACCEL=kvm|tcg` overrides (this matters on nested hosts whose /dev/kvm exists
    /// but cannot run a stock guest kernel).
    public static func detect(environment: [String: String] = ProcessInfo.processInfo.environment) -> Accelerator {
        if let forced = environment["FURCATE_ACCEL"].flatMap(Accelerator.init(rawValue:)) { return forced }
        let cpuinfo = readWholeFile("/proc/cpuinfo") ?? ""
        let flags = cpuinfo.split(separator: "\n").first { $0.hasPrefix("flags") } ?? ""
        let words = Set(flags.split(separator: " "))
        guard words.contains("vmx") || words.contains("svm") else { return .tcg }
        return access("/dev/kvm", R_OK | W_OK) == 0 ? .kvm : .tcg
    }
}

/// A tap device in a network namespace (see `MachineConfig.netTap`).
public struct NetTap: Sendable, Codable, Equatable {
    /// The namespace's name (in /run/netns).
    public var namespace: String
    /// The tap device there.
    public var device: String

    /// The tap `device` in `namespace`.
    public init(namespace: String, device: String) {
        self.namespace = namespace
        self.device = device
    }
}

/// Everything QEMU needs to start one microVM. Two machines restored from the same device
/// state must be started from configs that differ only in paths.
public struct MachineConfig: Sendable, Codable, Equatable {
    /// Virtual CPUs.
    public var vcpus: Int = 1
    /// Guest RAM in MiB.
    public var memoryMiB: Int = 256
    /// The file backing guest RAM (`memory-backend-file`).
    public var memoryPath: String
    /// true: MAP_SHARED — guest writes reach the file (mode a). false: MAP_PRIVATE — the file
    /// is a read-only base and guest writes stay in anonymous memory (mode b).
    public var memoryShared: Bool = true
    /// The guest kernel (bzImage).
    public var kernel: String
    /// The initramfs the kernel boots first.
    public var initrd: String
    /// Extra kernel parameters after Furcate's own.
    public var kernelArgs: String = ""
    /// The root disk (raw image), virtio-blk `/dev/vda`.
    public var rootDisk: String
    /// The unix socket QEMU listens on for the guest channel (virtio-serial port `furcate.0`).
    public var channelSocket: String
    /// A second port, `furcate.shell`, for a debug shell in test images (nil: none). Part of
    /// the machine: a restore must have it exactly when the snapshot's machine had it.
    public var shellSocket: String?
    /// QMP's unix socket.
    public var qmpSocket: String
    /// The guest's serial console is appended here.
    public var consoleLog: String
    /// KVM, or TCG's emulation where KVM cannot run a guest.
    public var accelerator: Accelerator = .tcg
    /// A virtio-net NIC on QEMU's user-mode network (slirp: outbound TCP/UDP through the host's
    /// own network, no privileges, no bridge). The initramfs configures it from `furcate.net=`.
    /// Part of the machine: a restore must have it exactly when the snapshot's machine had it.
    public var network = false
    /// With `network`: the network namespace QEMU runs in and the tap device there its NIC is
    /// on (VMNetwork), instead of user-mode networking. The guest sees the same NIC and
    /// addresses either way, so a snapshot restores on either.
    public var netTap: NetTap?
    /// TCG's translation cache in MiB: QEMU's default (1 GiB) would let a hundred idle forks
    /// reserve far more than they use.
    public var tcgCacheMiB: Int = 64

    /// The guest channel's virtio-serial port name; the guest finds its device by this name.
    public static let channelName = "furcate.0"
    /// The debug shell's port name.
    public static let shellName = "furcate.shell"
    /// Slirp's fixed addresses: the guest, the host as seen from the guest, the DNS forwarder.
    public static let guestAddress = "10.0.2.15/24"
    /// The host as slirp shows it to the guest: its default route.
    public static let gateway = "10.0.2.2"
    /// Slirp's DNS forwarder.
    public static let nameserver = "10.0.2.3"

    /// A machine with its files; everything else takes the defaults above.
    public init(
        memoryPath: String, kernel: String, initrd: String, rootDisk: String,
        channelSocket: String, qmpSocket: String, consoleLog: String
    ) {
        self.memoryPath = memoryPath
        self.kernel = kernel
        self.initrd = initrd
        self.rootDisk = rootDisk
        self.channelSocket = channelSocket
        self.qmpSocket = qmpSocket
        self.consoleLog = consoleLog
    }

    /// The kernel command line. `tsc_early_khz`: measured, a microvm under TCG otherwise hangs
    /// in early TSC calibration about half the time.
    public var commandLine: String {
        var s = "console=ttyS0 panic=-1 quiet reboot=t"
        if accelerator == .tcg { s += " tsc_early_khz=2000000" }
        if network { s += " furcate.net=\(Self.guestAddress),\(Self.gateway),\(Self.nameserver)" }
        if !kernelArgs.isEmpty { s += " " + kernelArgs }
        return s
    }

    /// QEMU's arguments. `incoming`: start waiting for a migration stream (`-incoming defer`)
    /// instead of booting.
    public func arguments(incoming: Bool) -> [String] {
        var a: [String] = [
            "-machine", "microvm,memory-backend=ram,isa-serial=on,rtc=on",
            "-cpu", accelerator == .kvm ? "host" : "max",
            "-smp", "\(vcpus)",
            "-m", "\(memoryMiB)M",
            "-object",
            "memory-backend-file,id=ram,size=\(memoryMiB)M,mem-path=\(Self.escape(memoryPath)),share=\(memoryShared ? "on" : "off")",
        ]
        // The kernel and initramfs only boot a machine. QEMU reads both into buffers of its own
        // that it keeps for the process's life (firmware config entries the boot loader copies
        // from); a restored guest has its kernel in RAM already and never reads them again.
        // Measured (Debian's cloud kernel): 13-14 MiB less PSS per fork (mode b 42 → 28 MiB),
        // spawn p50 35 → 27 ms.
        if !incoming { a += ["-kernel", kernel, "-initrd", initrd, "-append", commandLine] }
        a += [
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            "-chardev", "file,id=console,path=\(Self.escape(consoleLog))",
            "-serial", "chardev:console",
            "-drive", "id=root,file=\(Self.escape(rootDisk)),format=raw,if=none,cache=writeback,discard=unmap",
            "-device", "virtio-blk-device,drive=root",
            "-device", "virtio-serial-device,max_ports=4",
            "-chardev", "socket,id=channel,path=\(Self.escape(channelSocket)),server=on,wait=off",
            "-device", "virtserialport,chardev=channel,name=\(Self.channelName)",
        ]
        if let shellSocket {
            a += [
                "-chardev", "socket,id=shell,path=\(Self.escape(shellSocket)),server=on,wait=off",
                "-device", "virtserialport,chardev=shell,name=\(Self.shellName)",
            ]
        }
        if network {
            let backend =
                netTap.map { "tap,id=net0,ifname=\($0.device),script=no,downscript=no" } ?? "user,id=net0"
            a += ["-netdev", backend, "-device", "virtio-net-device,netdev=net0"]
        }
        a += [
            "-device", "virtio-rng-device",
            "-qmp", "unix:\(Self.escape(qmpSocket)),server=on,wait=off",
            // Streams saved here carry no run state: a restore resumes as soon as it is loaded.
            "-global", "migration.store-global-state=off",
            // No self-announce after a restore: by default QEMU has the guest send gratuitous
            // ARP and neighbour advertisements five times, for switches to learn where it moved.
            // A user-mode NIC is behind no switch (each QEMU has its own NAT); the announcing
            // only cost every fork kernel buffers of its own: measured, about 30 pages copied
            // on write per mode-b fork.
            "-global", "migration.announce-rounds=0",
        ]
        a += ["-accel", accelerator == .tcg ? "tcg,tb-size=\(tcgCacheMiB)" : "kvm"]
        // Booting: start paused (`-S`), the caller resumes. Restoring: QEMU starts the guest
        // itself the moment the device state is in (its autostart), without waiting for a
        // `cont` round trip; a stream that says the VM was paused (saved before QEMU was
        // told not to store the run state) stays paused, and the caller resumes it.
        a += incoming ? ["-incoming", "defer"] : ["-S"]
        return a
    }

    /// QEMU option values separate on commas; a literal comma is written twice.
    static func escape(_ s: String) -> String { s.replacingOccurrences(of: ",", with: ",,") }
}
