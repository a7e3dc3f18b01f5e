import Foundation
import FurcateCore

#if canImport(Glibc)
    import Glibc
#endif

/// A TCP relay on loopback in front of another port that breaks one connection off: the first
/// whose answers pass `cutAfter` bytes is closed there, mid-response, as a flaky network or a
/// registry restarting under a download would. Every later connection is relayed whole.
final class CuttingProxy: @unchecked Sendable {
    let port: Int
    private let target: Int
    private let cutAfter: Int
    private let listener: Int32
    private let lock = NSLock()
    private var cut = false
    /// Whether a connection was broken off.
    var didCut: Bool { lock.withLock { cut } }

    init(to target: Int, cutAfter: Int) throws {
        self.target = target
        self.cutAfter = cutAfter
        (listener, port) = try loopbackListener()
        let t = Thread { [self] in acceptLoop() }
        t.start()
    }

    /// Ends the accept loop and closes the listening socket.
    func stop() {
        shutdown(listener, Int32(SHUT_RDWR))
        close(listener)
    }

    private func acceptLoop() {
        while true {
            let client = accept(listener, nil, nil)
            guard client >= 0 else { return }
            let server = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            var a = sockaddr_in()
            a.sin_family = sa_family_t(AF_INET)
            a.sin_port = in_port_t(UInt16(target).bigEndian)
            a.sin_addr.s_addr = inet_addr("127.0.0.1")
            let r = withUnsafePointer(to: &a) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    connect(server, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
                }
            }
            guard r == 0 else {
                close(client)
                close(server)
                continue
            }
            let pair = Pair(client, server)
            Thread { [self] in pump(pair, from: client, to: server, counting: false) }.start()
            Thread { [self] in pump(pair, from: server, to: client, counting: true) }.start()
        }
    }

    /// A relayed connection's two sockets, closed once both directions have ended (closing
    /// earlier could hand a still-reading thread a descriptor number the kernel reused).
    private final class Pair: @unchecked Sendable {
        let fds: (Int32, Int32)
        private let lock = NSLock()
        private var running = 2
        init(_ a: Int32, _ b: Int32) { fds = (a, b) }
        /// Ends both directions (a read blocked in the other returns).
        func shutdownBoth() {
            shutdown(fds.0, Int32(SHUT_RDWR))
            shutdown(fds.1, Int32(SHUT_RDWR))
        }
        func ended() {
            guard
                lock.withLock({ () -> Bool in
                    running -= 1
                    return running == 0
                })
            else { return }
            close(fds.0)
            close(fds.1)
        }
    }

    /// Copies `from` to `to` until either ends; the answering direction counts its bytes and,
    /// once past `cutAfter` on the first connection to get there, breaks the connection off.
    private func pump(_ pair: Pair, from: Int32, to: Int32, counting: Bool) {
        var buf = [UInt8](repeating: 0, count: 16 << 10)
        var relayed = 0
        defer {
            pair.shutdownBoth()
            pair.ended()
        }
        while true {
            let n = buf.withUnsafeMutableBytes { read(from, $0.baseAddress, $0.count) }
            guard n > 0 else { return }
            var chunk = n
            var cutHere = false
            if counting {
                cutHere = lock.withLock { () -> Bool in
                    guard !cut, relayed + n > cutAfter else { return false }
                    cut = true
                    return true
                }
                if cutHere { chunk = max(0, cutAfter - relayed) }
                relayed += chunk
            }
            do {
                try buf.withUnsafeBytes {
                    try writeFully(to, UnsafeRawBufferPointer(rebasing: $0[0..<chunk]), path: "proxy")
                }
            } catch { return }
            if cutHere { return }
        }
    }
}
