import BlockStore
import Foundation
import FurcateCore
import FurcateTestSupport
import StoreFS
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// Why FUSE tests cannot run here, or nil when they can (root and /dev/fuse).
let fuseUnavailable: String? = {
    if access("/dev/fuse", R_OK | W_OK) != 0 { return "/dev/fuse is not usable" }
    if geteuid() != 0 { return "mounting needs root" }
    return nil
}()

let fuseAvailable = facilityAvailable("FUSE tests", unavailable: fuseUnavailable)

/// A store mounted by a real `furcate mount --foreground` child process.
final class Mounted {
    let tmp = TempDir("fs")
    var storeDir: String { tmp.sub("store") }
    var mountpoint: String { tmp.sub("mnt") }
    var files: String { mountpoint + "/files" }
    var snapshots: String { mountpoint + "/snapshots" }
    private(set) var server: Process?

    /// Creates a store (optionally filled by `prepare` before mounting) and mounts it.
    init(prepare: (BlockStore) throws -> Void = { _ in }) throws {
        try FileManager.default.createDirectory(atPath: mountpoint, withIntermediateDirectories: true)
        let s = try BlockStore.create(at: storeDir)
        try prepare(s)
        s.close()
        try mount()
    }

    func mount() throws {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: furcateBinary)
        p.arguments = ["mount", storeDir, mountpoint, "--foreground"]
        p.standardOutput = FileHandle.nullDevice
        try p.runWithSignalsUnblocked()
        server = p
        let deadline = Date().addingTimeInterval(20)
        while Date() < deadline {
            var sfs = statvfs()
            // statfs reaches the server (a stale mount from a killed one fails it).
            if StoreFS.isMountPoint(mountpoint) && statvfs(mountpoint, &sfs) == 0 && p.isRunning { return }
            if !p.isRunning { throw FurcateError(.io, "furcate mount exited with \(p.terminationStatus)") }
            usleep(5000)
        }
        throw FurcateError(.io, "mount did not appear")
    }

    /// Unmounts cleanly (SIGTERM to the server) and waits for it. Files still open keep a
    /// lazily unmounted filesystem served (the server logs who holds them): after 60 s the test
    /// fails, and a second SIGTERM has the server abort the connection, sync and end; SIGKILL
    /// only if that does not end it either. Never waits without bound. (60 s: the server syncs
    /// every dirty block first, and one clean-clone CI run with VMs booting beside it took over 15 s.)
    func unmount() {
        guard let p = server else { return }
        server = nil
        guard p.isRunning else { return }
        kill(p.processIdentifier, SIGTERM)
        if Self.exits(p, within: 60) { return }
        Issue.record("furcate mount did not exit within 60 s of SIGTERM (the holders of its files are in its log)")
        kill(p.processIdentifier, SIGTERM)
        if Self.exits(p, within: 30) { return }
        Issue.record("furcate mount did not exit within 30 s of a second SIGTERM either; killed")
        kill(p.processIdentifier, SIGKILL)
        umount2(mountpoint, Int32(MNT_DETACH))
        if !Self.exits(p, within: 30) {
            Issue.record("furcate mount (pid \(p.processIdentifier)) outlived SIGKILL by 30 s")
        }
    }

    /// True once `p` has exited, false if it still runs after `seconds`.
    static func exits(_ p: Process, within seconds: Double) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while p.isRunning && Date() < deadline { usleep(10_000) }
        return !p.isRunning
    }

    /// Kills the server with SIGKILL, leaving a stale mount behind.
    func kill9() {
        guard let p = server else { return }
        server = nil
        kill(p.processIdentifier, SIGKILL)
        if !Self.exits(p, within: 30) {
            Issue.record("furcate mount (pid \(p.processIdentifier)) outlived SIGKILL by 30 s")
        }
    }

    deinit {
        unmount()
        umount2(mountpoint, Int32(MNT_DETACH))
    }
}

/// Runs a command; returns its status and output.
@discardableResult
func sh(_ args: [String]) throws -> (Int32, String) {
    let r = try runCommand(args)
    return (r.status, r.output)
}
