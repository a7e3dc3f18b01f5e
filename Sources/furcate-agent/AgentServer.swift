import Glibc
import GuestAgentProtocol
import Synchronization

#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

/// Reads request frames, runs each on its own thread, writes response frames.
final class AgentServer: Sendable {
    let input: Int32
    let output: Int32
    /// stdio: end at end of input. A virtio port reads end-of-file while the host is not
    /// connected (between a snapshot and a fork's reconnect): wait and read again.
    let stopAtEOF: Bool
    private let writeLock = Mutex(())
    private let inFlight = Atomic<Int>(0)
    /// Streams running, by request id, with their cancel flags.
    private let streams = Mutex<[UInt32: StreamControl]>([:])
    static let maxInFlight = 64

    init(input: Int32, output: Int32, stopAtEOF: Bool) {
        self.input = input
        self.output = output
        self.stopAtEOF = stopAtEOF
    }

    func serve() {
        var decoder = FrameDecoder()
        var buf = [UInt8](repeating: 0, count: 256 << 10)
        while true {
            let n = buf.withUnsafeMutableBytes { read(input, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 {
                if stopAtEOF { return }
                decoder = FrameDecoder()  // a new host connection starts a new stream
                if n == 0 { waitForHost(input) } else { usleep(10_000) }
                continue
            }
            decoder.append(buf[0..<n])
            do {
                while let frame = try decoder.next() { dispatch(frame) }
            } catch {
                // A malformed stream cannot be resynchronized: say why, drop what was buffered.
                send(.error(AgentError(code: "invalid_argument", message: "malformed frame: \(error)")), id: 0)
                decoder = FrameDecoder()
                if stopAtEOF { return }
            }
        }
    }

    private func dispatch(_ frame: Frame) {
        guard frame.kind == .request else {
            send(.error(AgentError(code: "invalid_argument", message: "expected a request frame")), id: frame.id)
            return
        }
        let request: AgentRequest
        do { request = try AgentRequest.from(frame) } catch {
            send(
                .error(AgentError(code: "invalid_argument", message: "cannot decode the request: \(error)")),
                id: frame.id)
            return
        }
        guard inFlight.add(1, ordering: .relaxed).newValue <= Self.maxInFlight else {
            inFlight.subtract(1, ordering: .relaxed)
            send(
                .error(AgentError(code: "busy", message: "more than \(Self.maxInFlight) requests in flight")),
                id: frame.id)
            return
        }
        if case .cancel(let target) = request {
            let found = streams.withLock { $0[target] }
            found?.cancel()
            inFlight.subtract(1, ordering: .relaxed)
            send(
                found == nil ? .error(AgentError(code: "not_found", message: "no stream \(target)")) : .ok, id: frame.id
            )
            return
        }
        let id = frame.id
        var stream: StreamContext?
        if request.isStream {
            let control = StreamControl()
            streams.withLock { $0[id] = control }
            stream = StreamContext(control: control) { [self] event in sendEvent(event, id: id) }
        }
        // A few system calls answered on this thread: no thread to start, whose stack and
        // kernel task a just-restored fork would copy pages for (a fork's freshening is two
        // of these right after its restore).
        switch request {
        case .ping, .reseed, .setTime: return finish(request, id: id)
        default: break
        }
        startThread { [self] in
            let response = handle(request, stream: stream)
            if stream != nil { streams.withLock { $0[id] = nil } }
            inFlight.subtract(1, ordering: .relaxed)
            send(response, id: id)
        }
    }

    private func finish(_ request: AgentRequest, id: UInt32) {
        let response = handle(request, stream: nil)
        inFlight.subtract(1, ordering: .relaxed)
        send(response, id: id)
    }

    func sendEvent(_ event: AgentEvent, id: UInt32) {
        guard let payload = try? JSONEncoder().encode(event) else { return }
        write(Frame(kind: .event, id: id, payload: [UInt8](payload)).encoded())
    }

    func send(_ response: AgentResponse, id: UInt32) {
        let frame: Frame
        do { frame = try response.frame(id: id) } catch {
            frame = Frame(
                kind: .response, id: id,
                payload: Array(#"{"kind":"error","error":{"code":"io","message":"cannot encode the response"}}"#.utf8))
        }
        var bytes = frame.encoded()
        if bytes.count > Frame.headerSize + Frame.maxPayload {
            let msg =
                #"{"kind":"error","error":{"code":"invalid_argument","message":"response exceeds the frame limit"}}"#
            bytes = Frame(kind: .response, id: id, payload: Array(msg.utf8)).encoded()
        }
        write(bytes)
    }

    private func write(_ bytes: [UInt8]) {
        writeLock.withLock { _ in
            var done = 0
            while done < bytes.count {
                let n = bytes.withUnsafeBytes {
                    Glibc.write(output, $0.baseAddress.map { $0 + done }, bytes.count - done)
                }
                if n < 0 && errno == EINTR { continue }
                if n <= 0 { return }  // host gone: the response is lost, as the host expects
                done += n
            }
        }
    }
}

/// Waits, up to a second, for the host to connect to the virtio port `fd` (which reads
/// end-of-file while no host is connected). The virtio console driver sends SIGIO to the
/// port's owner when the host end opens or closes, so this thread sleeps until then instead
/// of reading again every few milliseconds — a forked VM often waits for its host without
/// doing anything else, and each wakeup would cost it CPU and memory pages of its own.
func waitForHost(_ fd: Int32) {
    var sigio = sigioSet()
    // Blocked in every thread (`servePort` blocks it before any start): kept pending for
    // sigtimedwait, never delivered.
    pthread_sigmask(SIG_BLOCK, &sigio, nil)
    let flags = fcntl(fd, F_GETFL)
    guard fcntl(fd, F_SETOWN, getpid()) == 0, fcntl(fd, F_SETFL, flags | O_ASYNC) == 0 else {
        usleep(10_000)
        return
    }
    defer { _ = fcntl(fd, F_SETFL, flags) }
    // The host may have connected between the read that saw end-of-file and O_ASYNC.
    if hostConnected(fd) { return }
    // SIGIO stays pending until taken, so none is missed: the limit is only a safety net. It
    // was 1 s, and every idle VM's waiters (a test image's debug shell, an agent without a
    // host) woke each second: measured, 0.05 MiB more copied on write per idle mode-b fork.
    var limit = timespec(tv_sec: 60, tv_nsec: 0)
    _ = sigtimedwait(&sigio, nil, &limit)
}

/// The set holding SIGIO alone (blocked, then waited for with sigtimedwait).
func sigioSet() -> sigset_t {
    var set = sigset_t()
    sigemptyset(&set)
    sigaddset(&set, SIGIO)
    return set
}

/// Whether the host end of the virtio port `fd` is open: the driver reports POLLHUP until it is.
func hostConnected(_ fd: Int32) -> Bool {
    var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
    return poll(&p, 1, 0) >= 0 && p.revents & Int16(POLLHUP) == 0
}

/// `--shell-on FD`: serves a `/bin/sh` session on the virtio port open as `fd` each time the
/// host connects, and sleeps in between (test images' debug shell). While no host is connected
/// the port reads end-of-file at once, so a shell started in a loop would exit and start again
/// many times a second in every idle VM (~30% of a host CPU under TCG, and pages copied in
/// every fork); this waits for the driver's SIGIO instead.
func serveShell(on fd: Int32) -> Never {
    var sigio = sigioSet()
    var previous = sigset_t()
    pthread_sigmask(SIG_BLOCK, &sigio, &previous)
    while true {
        while !hostConnected(fd) { waitForHost(fd) }
        let pid = fork()
        if pid == 0 {
            // The port stays open as `fd` too: background jobs of the session inherit it.
            for target in Int32(0)...2 { dup2(fd, target) }
            pthread_sigmask(SIG_SETMASK, &previous, nil)
            let argv: [UnsafeMutablePointer<CChar>?] = [strdup("sh"), nil]
            execv("/bin/sh", argv)
            _exit(127)
        }
        guard pid > 0 else {
            sleep(1)
            continue
        }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        // No shell to run (exit 127 from the child): not again at once while the host stays.
        if status & 0x7f == 0 && (status >> 8) & 0xff == 127 { sleep(1) }
    }
}

/// The device of the virtio-serial port called `name` (/dev/vportNpM), waiting for it.
func portDevice(_ name: String) -> String {
    while true {
        if let dir = opendir("/sys/class/virtio-ports") {
            defer { closedir(dir) }
            while let ent = readdir(dir) {
                let entry = withUnsafeBytes(of: ent.pointee.d_name) {
                    String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self)
                }
                if entry.hasPrefix(".") { continue }
                let fd = open("/sys/class/virtio-ports/\(entry)/name", O_RDONLY | O_CLOEXEC)
                guard fd >= 0 else { continue }
                var b = [UInt8](repeating: 0, count: 128)
                let n = b.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
                close(fd)
                if n > 0, String(decoding: b[0..<n].filter { $0 != 0x0a && $0 != 0 }, as: UTF8.self) == name {
                    return "/dev/\(entry)"
                }
            }
        }
        usleep(20_000)
    }
}

/// Serves the named port forever, reopening it if it fails.
func servePort(_ name: String) -> Never {
    var sigio = sigioSet()
    pthread_sigmask(SIG_BLOCK, &sigio, nil)  // before any thread starts: see waitForHost
    while true {
        let dev = portDevice(name)
        let fd = open(dev, O_RDWR | O_CLOEXEC)
        if fd < 0 {
            usleep(100_000)
            continue
        }
        AgentServer(input: fd, output: fd, stopAtEOF: false).serve()
        close(fd)
    }
}

/// Forks a supervisor in its own session that keeps an agent serving `port`: an agent that
/// dies is started again. Returns in the parent (which goes on to exec the image's init).
func startSupervised(port: String) {
    let pid = fork()
    guard pid == 0 else { return }
    setsid()
    signal(SIGPIPE, SIG_IGN)
    while true {
        let child = fork()
        if child == 0 { servePort(port) }
        var status: Int32 = 0
        while waitpid(child, &status, 0) < 0 && errno == EINTR {}
        usleep(200_000)
    }
}

/// The cancel flag of one stream.
final class StreamControl: Sendable {
    private let flag = Atomic<Bool>(false)
    func cancel() { flag.store(true, ordering: .relaxed) }
    var isCancelled: Bool { flag.load(ordering: .relaxed) }
}

/// What a streaming handler gets: a way to send events, and whether the host cancelled.
struct StreamContext: Sendable {
    let control: StreamControl
    let emit: @Sendable (AgentEvent) -> Void
    var isCancelled: Bool { control.isCancelled }
}
