// furcate-agent — runs inside every guest and answers the host over the virtio-serial port
// `furcate.0`: exec, files, clock, hostname, entropy. One static executable (no libc or Swift
// runtime needed in the image). Neighbours: GuestAgentProtocol (frames and messages, shared
// with the host's client); the initramfs starts it (`--then INIT`) before the image's init.
//
//   furcate-agent [--port NAME]       serve on the named virtio-serial port (default furcate.0)
//   furcate-agent --stdio             serve on stdin/stdout (tests)
//   furcate-agent --then INIT [ARGS]  as PID 1: start a supervised agent, then exec INIT
//   furcate-agent --run-as UID GID -- PROGRAM [ARGS]   (internal: services with user/group)
//   furcate-agent --shell-on FD       a /bin/sh session on the virtio port open as FD whenever
//                                     the host connects (test images' debug shell)
import CAgentInit
import Glibc
import GuestAgentProtocol

let agentVersion = "1"

var args = Array(CommandLine.arguments.dropFirst())
_ = cagent_init_linked()

/// Writes a line to standard error (fd 2; `stderr`, a C global, is not concurrency-safe).
func complain(_ s: String) {
    let line = Array((s + "\n").utf8)
    _ = line.withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
}

func usage() -> Never {
    complain("usage: furcate-agent [--port NAME] | --stdio | --then INIT [ARGS...] | --shell-on FD")
    exit(2)
}

if args.first == "--run-as" {
    runAs(Array(args.dropFirst()))
} else if args.first == "--then" {
    guard args.count >= 2 else { usage() }
    if access(args[1], X_OK) != 0 {
        // Most OCI images have no init: the agent's PID 1 then only mounts the basics and reaps.
        cagent_mount_basics()
        startSupervised(port: "furcate.0")
        complain("furcate-agent: no \(args[1]) in this image; the agent is the init")
        var status: Int32 = 0
        while true {
            if waitpid(-1, &status, 0) < 0 && errno == ECHILD { sleep(1) }
        }
    }
    startSupervised(port: "furcate.0")
    let initArgs = Array(args.dropFirst())
    let cargs: [UnsafeMutablePointer<CChar>?] = initArgs.map { strdup($0) } + [nil]
    execv(initArgs[0], cargs)
    complain("furcate-agent: cannot exec \(initArgs[0]): \(String(cString: strerror(errno)))")
    exit(1)
} else if args.first == "--shell-on" {
    guard args.count == 2, let fd = Int32(args[1]), fcntl(fd, F_GETFD) >= 0 else { usage() }
    serveShell(on: fd)
} else if args.first == "--stdio" {
    signal(SIGPIPE, SIG_IGN)
    if getenv("FURCATE_AGENT_STATE_DIR") != nil { Supervisor.shared.bootStart() }
    AgentServer(input: 0, output: 1, stopAtEOF: true).serve()
} else {
    var port = "furcate.0"
    if args.first == "--port" {
        guard args.count == 2 else { usage() }
        port = args[1]
    } else if !args.isEmpty {
        usage()
    }
    signal(SIGPIPE, SIG_IGN)
    Supervisor.shared.bootStart()
    servePort(port)
}
