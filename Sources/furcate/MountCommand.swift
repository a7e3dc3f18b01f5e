import ArgumentParser
import BlockStore
import CSpawn
import Foundation
import FurcateCore
import StoreFS

#if canImport(Glibc)
    import Glibc
#endif

struct MountCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "mount",
        abstract:
            "Serve a store's files through FUSE: MOUNTPOINT/files/NAME read-write, MOUNTPOINT/snapshots/NAME read-only."
    )

    @Argument(help: "Store directory.") var dir: String
    @Argument(help: "Empty directory to mount on.") var mountpoint: String
    @Flag(help: "Stay in the foreground (default: detach once the mount is live).") var foreground = false
    @Flag(help: "Let other users access the mount (needs user_allow_other for non-root).") var allowOther = false
    @Option(help: "FUSE worker threads.") var threads: UInt32 = 8
    @Flag(help: "Let the kernel cache writes (FUSE writeback cache).") var writebackCache = false
    @Option(help: "Readahead in KiB (0: leave the kernel's 128 KiB).") var readaheadKb = MountOptions().readaheadKB ?? 0
    @Option(help: "Percent of the system's dirty-page budget the mount may use (0: leave the kernel's 1%).")
    var maxDirtyRatio = MountOptions().maxDirtyRatio ?? 0

    func run() throws {
        try reportingErrors {
            if foreground { return try serve() }
            try detach()
        }
    }

    private func serve() throws {
        StoreFS.blockTerminationSignals()  // before any other thread starts
        bootstrapOnce
        let store = try openStore(dir)
        defer { store.close() }
        var o = MountOptions()
        o.allowOther = allowOther
        o.threads = threads
        o.writebackCache = writebackCache
        guard (0...(1 << 20)).contains(readaheadKb), (0...100).contains(maxDirtyRatio) else {
            throw FurcateError(.invalidArgument, "--readahead-kb must be 0 to 1048576 and --max-dirty-ratio 0 to 100")
        }
        o.readaheadKB = readaheadKb == 0 ? nil : readaheadKb
        o.maxDirtyRatio = maxDirtyRatio == 0 ? nil : maxDirtyRatio
        let fs = StoreFS(store: store, mountpoint: mountpoint, options: o)
        try fs.run {
            print("mounted \(dir) at \(mountpoint)")
            fflush(nil)
        }
    }

    /// Starts `furcate mount --foreground` in its own session (so a terminal's signals do not
    /// reach it) and returns once the mount is live, or fails with the child's exit status.
    private func detach() throws {
        var args = ["mount", dir, mountpoint, "--foreground", "--threads", "\(threads)"]
        if allowOther { args.append("--allow-other") }
        args += ["--readahead-kb", "\(readaheadKb)", "--max-dirty-ratio", "\(maxDirtyRatio)"]
        if writebackCache { args.append("--writeback-cache") }
        let exe =
            (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        posix_spawnattr_setflags(&attr, Int16(0x80))  // POSIX_SPAWN_SETSID
        let argv: [UnsafeMutablePointer<CChar>?] = ([exe] + args).map { strdup($0) } + [nil]
        defer { argv.forEach { free($0) } }
        // The server keeps none of our caller's descriptors: one it held (a pipe the caller
        // reads to its end, a lock) would keep the caller waiting as long as the mount lives.
        // Its "mounted" line would repeat ours; its errors reach stderr only when that is a
        // terminal (`--foreground` keeps them wherever stderr goes).
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0)
        if isatty(2) == 0 { posix_spawn_file_actions_addopen(&actions, 2, "/dev/null", O_WRONLY, 0) }
        cspawn_addclosefrom(&actions, 3)
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, exe, &actions, &attr, argv, environ)
        guard rc == 0 else { throw FurcateError.system("posix_spawn", errno: rc, path: exe) }
        let deadline = Date().addingTimeInterval(30)
        while Date() < deadline {
            var status: Int32 = 0
            if waitpid(pid, &status, WNOHANG) == pid {
                throw FurcateError(
                    .io, "mount server exited before the mount was live (status \(status >> 8))", path: mountpoint)
            }
            if StoreFS.isMountPoint(mountpoint) {
                print("mounted \(dir) at \(mountpoint) (server pid \(pid))")
                return
            }
            usleep(10_000)
        }
        kill(pid, SIGTERM)
        throw FurcateError(.io, "mount did not become live within 30 s", path: mountpoint)
    }
}
