import ArgumentParser
import Foundation
import FurcateCore
import Hypervisor

#if canImport(Glibc)
    import Glibc
#endif

/// `furcate doctor`: what this host can and cannot do for Furcate, each with how to fix it.
struct DoctorCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "doctor",
        abstract: "Check this host for furcate serve: root, KVM or TCG, FUSE, QEMU, guest artifacts, disk, cgroups.")
    @OptionGroup var data: DataOption
    @Flag(help: "Print the checks as JSON.") var json = false

    /// One finding: `ok` false on a required check fails the command.
    struct Check: Codable {
        enum Level: String, Codable { case ok, warn, fail }
        var name: String
        var level: Level
        var detail: String
        var fix: String?
    }

    func run() throws {
        try reportingErrors {
            let checks = Self.checks(layout: data.layout)
            if json {
                let e = JSONEncoder()
                e.outputFormatting = [.prettyPrinted, .sortedKeys]
                print(String(decoding: try e.encode(checks), as: UTF8.self))
            } else {
                for c in checks {
                    let mark = c.level == .ok ? "ok  " : c.level == .warn ? "warn" : "FAIL"
                    print("\(mark)  \(c.name.padding(toLength: 16, withPad: " ", startingAt: 0)) \(c.detail)")
                    if let fix = c.fix, c.level != .ok {
                        print("      \(String(repeating: " ", count: 16)) fix: \(fix)")
                    }
                }
            }
            let failed = checks.filter { $0.level == .fail }.map(\.name)
            guard failed.isEmpty else {
                throw FurcateError(
                    .unavailable, "this host cannot run furcate serve yet: \(failed.joined(separator: ", "))")
            }
        }
    }

    static func checks(layout: DataLayout) -> [Check] {
        var out: [Check] = []
        out.append(
            geteuid() == 0
                ? Check(name: "root", level: .ok, detail: "running as root")
                : Check(
                    name: "root", level: .fail, detail: "not root: serve mounts the store (FUSE) and runs QEMU",
                    fix: "run furcate as root (sudo), or as a systemd service"))
        switch Accelerator.detect() {
        case .kvm:
            out.append(Check(name: "accelerator", level: .ok, detail: "KVM (/dev/kvm opens; the CPU has vmx/svm)"))
        case .tcg:
            let forced = ProcessInfo.processInfo.environment["FURCATE_ACCEL"] == "tcg"
            out.append(
                Check(
                    name: "accelerator", level: .warn,
                    detail: forced
                        ? "TCG (FURCATE_ACCEL=tcg): guests run under QEMU's translator, many times slower than KVM"
                        : "TCG: no usable /dev/kvm or no vmx/svm; guests run under QEMU's translator",
                    fix:
                        "enable virtualization in the firmware or the VM's nested virtualization, and load kvm_intel/kvm_amd"
                ))
        }
        out.append(
            access("/dev/fuse", R_OK | W_OK) == 0
                ? Check(name: "fuse", level: .ok, detail: "/dev/fuse opens")
                : Check(
                    name: "fuse", level: .fail, detail: "/dev/fuse is missing or not readable and writable",
                    fix: "modprobe fuse (in a container: pass --device /dev/fuse)"))
        out.append(qemuCheck())
        out.append(artifactsCheck(layout.guest, candidates: layout.guestCandidates))
        out.append(diskCheck(layout.root))
        let v2 = FileManager.default.fileExists(atPath: "/sys/fs/cgroup/cgroup.controllers")
        out.append(
            Check(
                name: "cgroups", level: .ok, detail: v2 ? "v2 (unified hierarchy)" : "v1 (per-controller hierarchies)"))
        return out
    }

    /// QEMU's version (`qemu-system-x86_64 --version`); 7.2 or later (Debian 12's) is what is tested.
    static func qemuCheck() -> Check {
        let binary = QEMUProcess.binary
        let out = Pipe()
        let p = Process()
        p.executableURL = URL(fileURLWithPath: binary.hasPrefix("/") ? binary : "/usr/bin/env")
        p.arguments = binary.hasPrefix("/") ? ["--version"] : [binary, "--version"]
        p.standardOutput = out
        p.standardError = FileHandle.nullDevice
        let fix = "apt-get install qemu-system-x86 (or set FURCATE_QEMU to a QEMU binary)"
        do { try p.run() } catch { return Check(name: "qemu", level: .fail, detail: "no \(binary)", fix: fix) }
        let text = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        guard p.terminationStatus == 0, let line = text.split(separator: "\n").first else {
            return Check(name: "qemu", level: .fail, detail: "\(binary) --version failed", fix: fix)
        }
        let version = line.split(separator: " ").first { $0.first?.isNumber == true }.map(String.init) ?? "?"
        let parts = version.split(separator: ".").compactMap { Int($0) }
        let recent = parts.count >= 2 && (parts[0], parts[1]) >= (7, 2)
        return Check(
            name: "qemu", level: recent ? .ok : .warn, detail: "\(binary) \(version)",
            fix: recent ? nil : "QEMU 7.2 or later is what Furcate is tested with (Debian 12's)")
    }

    static func artifactsCheck(_ dir: String, candidates: [String]) -> Check {
        let needed = ["furcate-agent", "vmlinuz", "initrd.img", "debian-12-systemd.tar"]
        let missing = needed.filter { !FileManager.default.isReadableFile(atPath: dir + "/" + $0) }
        guard missing.isEmpty else {
            return Check(
                name: "guest artifacts", level: .fail,
                detail: "\(missing.joined(separator: ", ")) missing (looked in \(candidates.joined(separator: ", ")))",
                fix: "run scripts/setup.sh (or set FURCATE_GUEST_DIR to where they are)")
        }
        return Check(name: "guest artifacts", level: .ok, detail: dir)
    }

    /// Free space where the data directory is (or would be): under 10 GiB is a warning,
    /// under 1 GiB a failure.
    static func diskCheck(_ root: String) -> Check {
        var dir = root
        while !FileManager.default.fileExists(atPath: dir), dir != "/" {
            dir = (dir as NSString).deletingLastPathComponent
        }
        var s = statvfs()
        guard statvfs(dir, &s) == 0 else {
            return Check(name: "disk", level: .warn, detail: "cannot read free space at \(dir) (errno \(errno))")
        }
        let free = UInt64(s.f_bavail) * UInt64(s.f_frsize)
        let detail = "\(ByteSize.format(free)) free at \(dir) (data: \(root))"
        if free < 1 << 30 {
            return Check(name: "disk", level: .fail, detail: detail, fix: "free space or choose --data elsewhere")
        }
        if free < 10 << 30 {
            return Check(name: "disk", level: .warn, detail: detail, fix: "VM disks and snapshots want more room")
        }
        return Check(name: "disk", level: .ok, detail: detail)
    }
}
