import CSpawn
import Foundation

#if canImport(Glibc)
    import Glibc
#endif

/// Starts a program that must outlive its starter and never see its signals: QEMU, the
/// storage process. In its own session (`setsid`: a terminal's ^C or the parent's process
/// group signals never reach it), with default signal dispositions and an empty signal mask
/// (the threads that start it block termination signals for the FUSE server and Swift's
/// pools; the program must not inherit that), stdin from /dev/null, stdout and stderr appended
/// to `logPath`, and no other descriptor of ours: ones opened without O_CLOEXEC (an HTTP
/// server's accepted connections among them) would otherwise live as long as the program.
/// - Returns: its pid.
/// - Throws: `.notFound` when `executable` does not exist, `.io` for another spawn failure.
public func spawnDetached(_ executable: String, _ arguments: [String], environment: [String], logPath: String)
    throws -> pid_t
{
    let argv: [UnsafeMutablePointer<CChar>?] = ([executable] + arguments).map { strdup($0) } + [nil]
    defer { for a in argv { free(a) } }
    let envp: [UnsafeMutablePointer<CChar>?] = environment.map { strdup($0) } + [nil]
    defer { for e in envp { free(e) } }

    var attr = posix_spawnattr_t()
    posix_spawnattr_init(&attr)
    defer { posix_spawnattr_destroy(&attr) }
    // POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSID (glibc values).
    posix_spawnattr_setflags(&attr, Int16(0x04 | 0x08 | 0x80))
    var empty = sigset_t()
    sigemptyset(&empty)
    posix_spawnattr_setsigmask(&attr, &empty)
    var defaults = sigset_t()
    sigemptyset(&defaults)
    for s in [SIGINT, SIGTERM, SIGHUP, SIGPIPE, SIGCHLD] { sigaddset(&defaults, s) }
    posix_spawnattr_setsigdefault(&attr, &defaults)

    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
    posix_spawn_file_actions_addopen(&actions, 1, logPath, O_WRONLY | O_CREAT | O_APPEND, 0o640)
    posix_spawn_file_actions_adddup2(&actions, 1, 2)
    cspawn_addclosefrom(&actions, 3)

    var pid: pid_t = 0
    let rc = posix_spawn(&pid, executable, &actions, &attr, argv, envp)
    guard rc == 0 else {
        throw FurcateError(
            rc == ENOENT ? .notFound : .io, "cannot start \(executable)", path: executable, operation: "posix_spawn",
            errno: rc)
    }
    return pid
}
