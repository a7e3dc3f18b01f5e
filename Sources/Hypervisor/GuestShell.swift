import Foundation
import FurcateCore
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// A shell on the guest channel (the virtio-serial port `furcate.0`), as the test rootfs
/// serves it. This is the interim way to reach a guest until the guest agent (its own module)
/// speaks a framed protocol on the same port; tests and `furcate bench fork` use it to prove
/// a guest answers.
///
/// Each command runs in the guest's one long-lived shell; its output ends with a marker line
/// carrying the exit status. A guest discards what arrives while its end of the port is
/// closed, so `connect` repeats a probe until the shell answers.
public final class GuestShell: Sendable {
    private let fd: Int32
    private let nonce = UInt32.random(in: 0...UInt32.max)
    private let state = Mutex<(buffer: [UInt8], counter: Int)>(([], 0))

    /// Connects to the channel socket and waits until the guest's shell answers.
    /// - Throws: `.timedOut` when it does not answer by `timeout`.
    public convenience init(socket: String, timeout: Duration) async throws {
        try await self.init(socket: socket, deadline: .after(timeout))
    }

    /// Connects and waits until `deadline` (a run-time one on the VM's QEMU waits longer for a
    /// guest that a loaded host has not given the CPU to answer; see `Deadline`).
    public init(socket: String, deadline: Deadline) async throws {
        fd = try await UnixSocket.connect(socket, deadline: deadline)
        // The answer is computed by the shell, so a probe the guest received only in part (it
        // drops what arrives while its end is closed) cannot produce it.
        let probe = "__furcate_ready_\(nonce)_"
        while true {
            try UnixSocket.writeAll(fd, Array("echo \(probe)$((6*7))\n".utf8))
            if (try? await readLine(finding: probe + "42", atLineStart: true, deadline: .now + .milliseconds(200)))
                != nil
            {
                break
            }
            if deadline.hasPassed {
                Glibc.close(fd)
                throw FurcateError(.timedOut, "the guest's shell did not answer within \(deadline)", path: socket)
            }
        }
        // Answers to earlier probes may still arrive: one marked no-op drains them.
        _ = try await run("true", timeout: .seconds(30))
    }

    deinit { Glibc.close(fd) }

    /// Runs `command` in the guest; returns its combined output and exit status.
    /// - Throws: `.timedOut`, `.io` when the channel closes.
    public func run(_ command: String, timeout: Duration = .seconds(30)) async throws -> (output: String, status: Int32)
    {
        let n = state.withLock { s -> Int in
            s.counter += 1
            return s.counter
        }
        let marker = "__furcate_rc_\(nonce)_\(n)"
        try UnixSocket.writeAll(fd, Array("{ \(command)\n} 2>&1; echo \"\(marker)_$((0)) $?\"\n".utf8))
        let (before, line) = try await readLine(finding: marker + "_0 ", atLineStart: false, deadline: .now + timeout)
        let status = Int32(line.split(separator: " ").last ?? "") ?? -1
        return (before, status)
    }

    /// Reads until a line containing `needle`; returns the text before that line and the line.
    private func readLine(finding needle: String, atLineStart: Bool, deadline: ContinuousClock.Instant) async throws
        -> (String, String)
    {
        let fd = fd
        let needleBytes = Array(needle.utf8)
        while true {
            if let found = state.withLock({ s -> (String, String)? in
                guard let r = Self.findLine(s.buffer, needleBytes, atLineStart: atLineStart) else { return nil }
                let before = String(decoding: s.buffer[..<r.lowerBound], as: UTF8.self)
                let line = String(decoding: s.buffer[r], as: UTF8.self)
                s.buffer.removeSubrange(..<min(r.upperBound + 1, s.buffer.count))
                return (before, line)
            }) {
                return found
            }
            let left = deadline - .now
            guard left > .zero else { throw FurcateError(.timedOut, "no answer from the guest's shell") }
            var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let ms = Int32(
                min(left.components.seconds * 1000 + left.components.attoseconds / 1_000_000_000_000_000, 100))
            let r = poll(&pfd, 1, max(ms, 1))
            if r < 0 && errno != EINTR { throw FurcateError.system("poll", errno: errno) }
            if r > 0 {
                var chunk = [UInt8](repeating: 0, count: 16 << 10)
                let got = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
                if got == 0 { throw FurcateError(.io, "the guest channel closed") }
                if got > 0 { state.withLock { $0.buffer.append(contentsOf: chunk[0..<got]) } }
            }
            await Task.yield()
        }
    }

    /// The range from the first `needle` in a complete line to that line's end (without the
    /// newline). A command's marker may follow output that did not end in a newline. The probe
    /// must start its line: a probe the guest got only in part runs as a command whose error
    /// message names it ("sh: __furcate_ready_…_42: not found").
    private static func findLine(_ buf: [UInt8], _ needle: [UInt8], atLineStart: Bool) -> Range<Int>? {
        guard let nlLast = buf.lastIndex(of: UInt8(ascii: "\n")), nlLast + 1 >= needle.count else { return nil }
        var i = 0
        while i + needle.count <= nlLast {
            if buf[i] == needle[0] && (!atLineStart || i == 0 || buf[i - 1] == UInt8(ascii: "\n"))
                && buf[i..<(i + needle.count)].elementsEqual(needle)
            {
                let end = buf[i...].firstIndex(of: UInt8(ascii: "\n")) ?? nlLast
                return i..<end
            }
            i += 1
        }
        return nil
    }
}
