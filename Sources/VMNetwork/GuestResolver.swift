// The guests' DNS resolver: a UDP socket at 10.0.2.3:53 inside each VM network's namespace
// (made there by a thread that enters it, served by this process's event loops), answering
// only names the VM's policy lets it resolve, by asking the host's upstream resolvers. The
// IPv4 answers for an allowed name go into the VM's name set before the guest sees them, so
// its first connection to them passes the firewall; an address the guest did not get that
// way stays closed.
import CNetns
import Foundation
import FurcateCore
import Logging
import NIOCore
import NIOPosix
import Synchronization

/// A DNS server the resolver asks: an IPv4 address and port.
public struct DNSServer: Sendable, Equatable, CustomStringConvertible {
    /// Its address.
    public var address: IPv4Address
    /// Its UDP port.
    public var port: UInt16

    /// A server.
    public init(_ address: IPv4Address, port: UInt16 = 53) {
        self.address = address
        self.port = port
    }

    /// `a.b.c.d` or `a.b.c.d:port`.
    /// - Throws: `.invalidArgument` for anything else.
    public init(parsing text: String) throws {
        let parts = text.split(separator: ":", omittingEmptySubsequences: false)
        guard (1...2).contains(parts.count), let a = IPv4Address(parts[0]),
            let p = parts.count == 2 ? UInt16(parts[1]) : 53, p != 0
        else {
            throw FurcateError(
                .invalidArgument, "a DNS server is an IPv4 address with an optional :port, not '\(text)'")
        }
        self.init(a, port: p)
    }

    /// `a.b.c.d`, with `:port` unless 53.
    public var description: String { port == 53 ? "\(address)" : "\(address):\(port)" }

    /// The IPv4 name servers of `/etc/resolv.conf` (empty when it names none).
    public static func fromResolvConf(_ path: String = "/etc/resolv.conf") -> [DNSServer] {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { return [] }
        return text.split(separator: "\n").compactMap { line in
            let f = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
            guard f.count >= 2, f[0] == "nameserver", let a = IPv4Address(f[1]) else { return nil }
            return DNSServer(a)
        }
    }
}

/// The resolver of every VM network of a host (one listener per network).
public final class GuestResolver: Sendable {
    /// Seconds an allowed name's addresses stay reachable at least (a shorter TTL is raised to
    /// this, so that a connection made soon after the answer and kept open is not cut).
    public static let minimumLifetime = 300
    /// Seconds at most.
    static let maximumLifetime = 86_400
    /// Queries of one VM the resolver works on at once; more are dropped (the guest retries).
    static let maxInFlight = 64
    /// How long one upstream has to answer.
    static let upstreamTimeout = TimeAmount.seconds(2)

    /// Whom it asks.
    public let upstreams: [DNSServer]
    let table: String
    let logger: Logger
    private let listeners = Mutex<[Int: Listener]>([:])

    struct Listener: Sendable {
        var channel: any Channel
        var plan: VMNetworkPlan
        var policy: EgressPolicy
        var inFlight = 0
    }

    /// A resolver asking `upstreams`, adding allowed addresses to sets of nftables `table`.
    init(upstreams: [DNSServer], table: String, logger: Logger = Logger(label: "furcate.dns")) {
        self.upstreams = upstreams
        self.table = table
        self.logger = logger
    }

    /// Serves `p`'s guest with `policy` (a listener it had is replaced).
    /// - Throws: `.io` when the socket cannot be made in its namespace.
    func listen(_ p: VMNetworkPlan, policy: EgressPolicy) throws {
        close(p.index)
        let fd = try Self.socket(in: "/run/netns/\(p.namespace)")
        let index = p.index
        let channel: any Channel
        do {
            channel = try DatagramBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                .channelInitializer { ch in
                    ch.eventLoop.makeCompletedFuture {
                        try ch.pipeline.syncOperations.addHandler(QueryHandler(resolver: self, index: index))
                    }
                }
                .withBoundSocket(fd).wait()
        } catch {
            Glibc.close(fd)
            throw FurcateError(.io, "cannot serve DNS in \(p.namespace)", underlying: UnderlyingMessage(error))
        }
        listeners.withLock { $0[index] = Listener(channel: channel, plan: p, policy: policy) }
    }

    /// The policy `index`'s listener answers by, if it listens.
    func policy(_ index: Int) -> EgressPolicy? { listeners.withLock { $0[index]?.policy } }

    /// Answers `index`'s guest by `policy` from now on.
    func setPolicy(_ index: Int, _ policy: EgressPolicy) {
        listeners.withLock { $0[index]?.policy = policy }
    }

    /// Stops serving `index`'s guest.
    func close(_ index: Int) {
        if let l = listeners.withLock({ $0.removeValue(forKey: index) }) {
            l.channel.close(promise: nil)
        }
    }

    /// Whether `index`'s guest is served.
    func isListening(_ index: Int) -> Bool { listeners.withLock { $0[index] != nil } }

    /// A UDP socket bound to the resolver's address in the namespace at `path`, made on a
    /// thread of its own (it enters the namespace and leaves it again).
    static func socket(in path: String) throws -> CInt {
        let result = Mutex<CInt>(-EINVAL)
        let done = DispatchSemaphore(value: 0)
        let t = Thread {
            result.withLock {
                $0 = cnetns_bound_socket(path, Int32(SOCK_DGRAM.rawValue), GuestAddressing.resolver.value, 53)
            }
            done.signal()
        }
        t.start()
        done.wait()
        let fd = result.withLock { $0 }
        guard fd >= 0 else {
            throw FurcateError(
                .io, "cannot bind \(GuestAddressing.resolver):53 in \(path): \(String(cString: strerror(-fd)))")
        }
        return fd
    }

    // MARK: answering

    /// Takes a query of `index`'s guest: nil when it is to be dropped (not a query, too many
    /// at once); else it is answered through `reply`.
    fileprivate func take(_ bytes: [UInt8], index: Int) -> (DNSQuery, Listener)? {
        guard let q = DNSMessage.query(bytes) else { return nil }
        return listeners.withLock { all -> (DNSQuery, Listener)? in
            guard var l = all[index], l.inFlight < Self.maxInFlight else { return nil }
            l.inFlight += 1
            all[index] = l
            return (q, l)
        }
    }

    fileprivate func finished(_ index: Int) {
        listeners.withLock { all in
            if var l = all[index] {
                l.inFlight -= 1
                all[index] = l
            }
        }
    }

    /// The answer to `bytes` (query `q`) for a guest under `l`'s policy.
    fileprivate func answer(_ bytes: [UInt8], _ q: DNSQuery, _ l: Listener) async -> [UInt8] {
        let name = q.question.name
        guard q.question.qclass == 1, l.policy.resolves(name) else {
            return DNSMessage.refusal(bytes, q, code: .refused)
        }
        for upstream in upstreams {
            guard let response = try? await ask(upstream, bytes) else { continue }
            guard let found = DNSMessage.addresses(in: response, answering: q) else { continue }
            // An allowed name's public addresses are let through before the guest sees them.
            if l.policy.namesAllowed(name), !found.isEmpty {
                let open = found.filter { a in !IPv4Network.blockedByDefault.contains { $0.contains(a.address) } }
                    .map { ($0.address, min(max(Int($0.ttl), Self.minimumLifetime), Self.maximumLifetime)) }
                if !open.isEmpty {
                    do {
                        let rules = HostRules.addResolved(l.plan, open, table: table)
                        _ = try await NIOThreadPool.singleton.runIfActive {
                            try HostTool.run("nft", ["-f", "-"], input: rules, package: "nftables")
                        }
                    } catch {
                        logger.error(
                            "cannot let a VM reach the addresses of an allowed name",
                            metadata: ["vm.network": "\(l.plan.index)", "name": "\(name)", "error": "\(error)"])
                        return DNSMessage.refusal(bytes, q, code: .serverFailure)
                    }
                }
            }
            return response
        }
        return DNSMessage.refusal(bytes, q, code: .serverFailure)
    }

    /// `query` sent to `upstream` from this host, and its first response from there.
    private func ask(_ upstream: DNSServer, _ query: [UInt8]) async throws -> [UInt8] {
        let group = MultiThreadedEventLoopGroup.singleton
        let loop = group.next()
        let promise = loop.makePromise(of: [UInt8].self)
        let target = try SocketAddress(ipAddress: "\(upstream.address)", port: Int(upstream.port))
        let channel = try await DatagramBootstrap(group: loop)
            .channelInitializer { ch in
                ch.eventLoop.makeCompletedFuture {
                    try ch.pipeline.syncOperations.addHandler(UpstreamHandler(from: target, promise: promise))
                }
            }
            .bind(host: "0.0.0.0", port: 0).get()
        let timeout = loop.scheduleTask(in: Self.upstreamTimeout) {
            promise.fail(FurcateError(.timedOut, "\(upstream) did not answer"))
        }
        var buffer = channel.allocator.buffer(capacity: query.count)
        buffer.writeBytes(query)
        channel.writeAndFlush(AddressedEnvelope(remoteAddress: target, data: buffer), promise: nil)
        defer {
            timeout.cancel()
            channel.close(promise: nil)
        }
        return try await promise.futureResult.get()
    }
}

/// Reads a listener's queries and answers each on its own task.
private final class QueryHandler: ChannelInboundHandler, Sendable {
    typealias InboundIn = AddressedEnvelope<ByteBuffer>
    typealias OutboundOut = AddressedEnvelope<ByteBuffer>

    let resolver: GuestResolver
    let index: Int

    init(resolver: GuestResolver, index: Int) {
        self.resolver = resolver
        self.index = index
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let envelope = unwrapInboundIn(data)
        let bytes = Array(envelope.data.readableBytesView)
        guard let (q, l) = resolver.take(bytes, index: index) else { return }
        let (resolver, index, channel, guest) = (resolver, index, context.channel, envelope.remoteAddress)
        Task {
            let answer = await resolver.answer(bytes, q, l)
            resolver.finished(index)
            var out = channel.allocator.buffer(capacity: answer.count)
            out.writeBytes(answer)
            channel.writeAndFlush(AddressedEnvelope(remoteAddress: guest, data: out), promise: nil)
        }
    }
}

/// Takes the first datagram from the upstream asked.
private final class UpstreamHandler: ChannelInboundHandler, Sendable {
    typealias InboundIn = AddressedEnvelope<ByteBuffer>

    let from: SocketAddress
    let promise: EventLoopPromise<[UInt8]>

    init(from: SocketAddress, promise: EventLoopPromise<[UInt8]>) {
        self.from = from
        self.promise = promise
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let envelope = unwrapInboundIn(data)
        guard envelope.remoteAddress == from else { return }
        promise.succeed(Array(envelope.data.readableBytesView))
    }
}
