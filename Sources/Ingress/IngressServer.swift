// Ingress — the HTTP listener that makes VMs' ports reachable by host name: it reads the head
// of a connection's first request, asks its router where the Host header points, connects
// there, and from then on copies bytes both ways. Bodies, streamed responses, server-sent
// events and WebSocket upgrades pass through untouched; the router (FurcateEngine) decides.
import FurcateCore
import Logging
import NIOCore
import NIOPosix
import ServiceLifecycle
import Synchronization

/// The head of a request, as the ingress read it.
public struct IngressRequest: Sendable {
    /// "GET", "POST", …
    public var method: String
    /// The request target ("/path?query").
    public var target: String
    /// The Host header, lowercased, without its port.
    public var host: String
    /// Every header line, in order, names as sent.
    public var headers: [(name: String, value: String)]

    /// The value of the first header named `name` (case-insensitive).
    public func header(_ name: String) -> String? {
        headers.first { $0.name.lowercased() == name.lowercased() }?.value
    }

    /// Whether it asks to switch protocols (a WebSocket handshake).
    public var isUpgrade: Bool { header("upgrade") != nil }
}

/// Where a request goes.
public enum IngressRoute: Sendable, Equatable {
    /// To `address`:`port`, counted against `vm`'s connection limit; `dropHeaders` are removed
    /// from the head first (credentials meant for this server, never for the guest), and with
    /// `closeAfter` the connection carries this one request only.
    case forward(address: String, port: Int, vm: String, dropHeaders: [String], closeAfter: Bool)
    /// Answered here: a status and a JSON body saying why.
    case refuse(status: Int, error: String, message: String)
}

/// Decides where each request goes.
public protocol IngressRouter: Sendable {
    /// The route of `request`; may wake a VM first (it is awaited).
    func route(_ request: IngressRequest) async -> IngressRoute
}

/// Settings of the listener.
public struct IngressOptions: Sendable {
    /// Address to listen on.
    public var host: String
    /// Port to listen on (0: any free one; `IngressServer.port` says which).
    public var port: Int
    /// Open connections one VM may have through the ingress; more are answered 503.
    public var connectionsPerVM = 256
    /// Largest request head read before routing; larger ones are answered 431.
    public var maxHeadBytes = 32 << 10
    /// How long a client has to send its request head.
    public var headTimeout: TimeAmount = .seconds(15)
    /// How long a connection to a guest may take.
    public var connectTimeout: TimeAmount = .seconds(5)

    /// Listen on `host`:`port`.
    public init(host: String, port: Int) {
        self.host = host
        self.port = port
    }
}

/// The ingress listener; a ServiceLifecycle service.
public final class IngressServer: Service, Sendable {
    let options: IngressOptions
    let router: any IngressRouter
    let logger: Logger
    let group: MultiThreadedEventLoopGroup
    let connections = Mutex<[String: Int]>([:])
    private let bound = Mutex<(channel: (any Channel)?, waiters: [CheckedContinuation<Int, any Error>])>((nil, []))

    /// A listener over `router` (nothing listens before `run`).
    public init(options: IngressOptions, router: any IngressRouter, logger: Logger) {
        self.options = options
        self.router = router
        self.logger = logger
        group = MultiThreadedEventLoopGroup.singleton
    }

    /// The port it listens on, once it does.
    public func port() async throws -> Int {
        try await withCheckedThrowingContinuation { c in
            bound.withLock { b in
                if let ch = b.channel, let p = ch.localAddress?.port {
                    c.resume(returning: p)
                } else {
                    b.waiters.append(c)
                }
            }
        }
    }

    /// Stops listening (`run` returns); open connections go on until they end.
    public func stop() {
        bound.withLock { $0.channel }?.close(promise: nil)
    }

    /// Open connections through the ingress to `vm`.
    public func openConnections(_ vm: String) -> Int { connections.withLock { $0[vm] ?? 0 } }

    /// Listens until the service group shuts down.
    public func run() async throws {
        let server = self
        let channel: any Channel
        do {
            channel = try await ServerBootstrap(group: group)
                .serverChannelOption(.backlog, value: 512)
                .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                .childChannelOption(.autoRead, value: true)
                .childChannelInitializer { ch in
                    ch.eventLoop.makeCompletedFuture {
                        try ch.pipeline.syncOperations.addHandler(HeadReader(server: server))
                    }
                }
                .bind(host: options.host, port: options.port).get()
        } catch {
            let e = FurcateError(
                .io, "the ingress cannot listen on \(options.host):\(options.port) (--ingress-port)",
                underlying: UnderlyingMessage(error))
            bound.withLock { b in
                for w in b.waiters { w.resume(throwing: e) }
                b.waiters = []
            }
            throw e
        }
        let p = channel.localAddress?.port ?? options.port
        bound.withLock { b in
            b.channel = channel
            for w in b.waiters { w.resume(returning: p) }
            b.waiters = []
        }
        logger.info("ingress listening", metadata: ["address": "\(options.host):\(p)"])
        try await withGracefulShutdownHandler {
            try await channel.closeFuture.get()
        } onGracefulShutdown: {
            channel.close(promise: nil)
        }
    }

    /// Counts a connection to `vm`; false when it is at its limit.
    func admit(_ vm: String) -> Bool {
        connections.withLock { c in
            let n = c[vm] ?? 0
            guard n < options.connectionsPerVM else { return false }
            c[vm] = n + 1
            return true
        }
    }

    func release(_ vm: String) {
        connections.withLock { c in
            let n = (c[vm] ?? 1) - 1
            c[vm] = n > 0 ? n : nil
        }
    }
}

/// A complete HTTP/1.x request head, parsed; nil when the bytes are not one.
func parseHead(_ text: Substring) -> IngressRequest? {
    var lines = text.split(separator: "\r\n", omittingEmptySubsequences: false)
    guard let first = lines.first else { return nil }
    lines.removeFirst()
    let parts = first.split(separator: " ", omittingEmptySubsequences: false)
    guard parts.count == 3, parts[2].hasPrefix("HTTP/1."), !parts[0].isEmpty, !parts[1].isEmpty else { return nil }
    var headers: [(String, String)] = []
    for l in lines where !l.isEmpty {
        guard let colon = l.firstIndex(of: ":"), colon != l.startIndex else { return nil }
        let name = l[..<colon]
        guard !name.contains(" "), !name.contains("\t") else { return nil }
        headers.append((String(name), l[l.index(after: colon)...].trimmingCharacters(in: [" ", "\t"])))
    }
    let hosts = headers.filter { $0.0.lowercased() == "host" }
    guard hosts.count == 1 else { return nil }
    var host = hosts[0].1.lowercased()
    if host.hasPrefix("[") { return nil }  // IPv6 literals name no VM
    if let c = host.lastIndex(of: ":") { host = String(host[..<c]) }
    return IngressRequest(method: String(parts[0]), target: String(parts[1]), host: host, headers: headers)
}

extension Substring {
    fileprivate func trimmingCharacters(in set: Set<Character>) -> String {
        var s = self[...]
        while let f = s.first, set.contains(f) { s = s.dropFirst() }
        while let l = s.last, set.contains(l) { s = s.dropLast() }
        return String(s)
    }
}

/// The head as it is sent on to the guest: `drop` removed, `Connection: close` with `close`
/// (an upgrade keeps its Connection header), X-Forwarded-For/-Proto/-Host added.
func renderHead(_ r: IngressRequest, drop: [String], close: Bool, client: String?) -> String {
    let dropped = Set(drop.map { $0.lowercased() } + ["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"])
    var s = "\(r.method) \(r.target) HTTP/1.1\r\n"
    for h in r.headers {
        let n = h.name.lowercased()
        if dropped.contains(n) || (close && !r.isUpgrade && (n == "connection" || n == "keep-alive")) { continue }
        s += "\(h.name): \(h.value)\r\n"
    }
    if close && !r.isUpgrade { s += "Connection: close\r\n" }
    if let client { s += "X-Forwarded-For: \(client)\r\n" }
    s += "X-Forwarded-Proto: http\r\nX-Forwarded-Host: \(r.host)\r\n\r\n"
    return s
}

/// Reads a connection's first request head, routes it, then splices the connection to the
/// guest (GlueHandler) or answers it.
final class HeadReader: ChannelInboundHandler, RemovableChannelHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    let server: IngressServer
    var buffer = ByteBuffer()
    var routing = false
    var timeout: Scheduled<Void>?

    init(server: IngressServer) { self.server = server }

    func handlerAdded(context: ChannelHandlerContext) {
        let ch = context.channel
        timeout = context.eventLoop.scheduleTask(in: server.options.headTimeout) {
            ch.close(promise: nil)
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var bytes = unwrapInboundIn(data)
        buffer.writeBuffer(&bytes)
        guard !routing else { return }
        let b = buffer
        let view = b.readableBytesView
        guard let end = find(view, "\r\n\r\n") else {
            if b.readableBytes > server.options.maxHeadBytes {
                respond(
                    context, 431, "HEADER_TOO_LARGE", "the request head is over \(server.options.maxHeadBytes) bytes")
            }
            return
        }
        let headLength = end - view.startIndex
        guard headLength <= server.options.maxHeadBytes else {
            respond(context, 431, "HEADER_TOO_LARGE", "the request head is over \(server.options.maxHeadBytes) bytes")
            return
        }
        guard let text = b.getString(at: b.readerIndex, length: headLength), let request = parseHead(text[...]) else {
            respond(context, 400, "BAD_REQUEST", "not an HTTP/1.1 request with one Host header")
            return
        }
        routing = true
        timeout?.cancel()
        context.channel.setOption(.autoRead, value: false).whenComplete { _ in }
        let loop = context.eventLoop
        let router = server.router
        let ctx = NIOLoopBound(context, eventLoop: loop)
        let client = context.channel.remoteAddress?.ipAddress
        Task {
            let route = await router.route(request)
            loop.execute {
                self.proceed(ctx.value, request, route, client: client, headEnd: headLength + 4)
            }
        }
    }

    private func proceed(
        _ context: ChannelHandlerContext, _ request: IngressRequest, _ route: IngressRoute, client: String?,
        headEnd: Int
    ) {
        switch route {
        case .refuse(let status, let error, let message):
            respond(context, status, error, message)
        case .forward(let address, let port, let vm, let drop, let closeAfter):
            guard server.admit(vm) else {
                respond(
                    context, 503, "TOO_MANY_CONNECTIONS",
                    "VM \(vm) has \(server.options.connectionsPerVM) open connections through the ingress; try again later"
                )
                return
            }
            let server = self.server
            context.channel.closeFuture.whenComplete { _ in server.release(vm) }
            var pending = buffer
            pending.moveReaderIndex(forwardBy: headEnd)
            let rest = pending
            let head = renderHead(request, drop: drop, close: closeAfter, client: client)
            let inbound = context.channel
            let ctx = NIOLoopBound(context, eventLoop: context.eventLoop)
            ClientBootstrap(group: context.eventLoop)
                .connectTimeout(server.options.connectTimeout)
                .channelOption(.socketOption(.tcp_nodelay), value: 1)
                .connect(host: address, port: port)
                .hop(to: context.eventLoop)
                .whenComplete { result in
                    let context = ctx.value
                    switch result {
                    case .failure(let e):
                        server.logger.debug(
                            "ingress cannot reach a guest",
                            metadata: ["vm.id": "\(vm)", "port": "\(port)", "error": "\(e)"])
                        self.respond(
                            context, 502, "VM_PORT_UNREACHABLE",
                            "nothing answers on port \(port) of VM \(vm) (is a server listening on 0.0.0.0:\(port) in the guest?)"
                        )
                    case .success(let outbound):
                        var first = outbound.allocator.buffer(capacity: head.utf8.count + rest.readableBytes)
                        first.writeString(head)
                        var body = rest
                        first.writeBuffer(&body)
                        outbound.writeAndFlush(first, promise: nil)
                        let (a, b) = GlueHandler.pair()
                        do {
                            try context.pipeline.syncOperations.addHandler(a)
                            try outbound.pipeline.syncOperations.addHandler(b)
                        } catch {
                            outbound.close(promise: nil)
                            inbound.close(promise: nil)
                            return
                        }
                        context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
                        inbound.setOption(.autoRead, value: true).whenComplete { _ in }
                    }
                }
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        timeout?.cancel()
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) { context.close(promise: nil) }

    private func respond(_ context: ChannelHandlerContext, _ status: Int, _ error: String, _ message: String) {
        let body = "{\"error\":\"\(error)\",\"message\":\(jsonString(message))}\n"
        let reason =
            [
                400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 409: "Conflict",
                431:
                    "Request Header Fields Too Large", 502: "Bad Gateway", 503: "Service Unavailable",
                504: "Gateway Timeout",
            ][status] ?? "Error"
        var out = context.channel.allocator.buffer(capacity: body.utf8.count + 160)
        out.writeString(
            "HTTP/1.1 \(status) \(reason)\r\nContent-Type: application/json\r\nContent-Length: \(body.utf8.count)\r\nConnection: close\r\n\r\n\(body)"
        )
        let ch = context.channel
        context.writeAndFlush(wrapOutboundOut(out)).whenComplete { _ in ch.close(promise: nil) }
    }

    private func find(_ view: ByteBufferView, _ needle: String) -> Int? {
        let n = Array(needle.utf8)
        var i = view.startIndex
        while i + n.count <= view.endIndex {
            if view[i] == n[0], view[i + 1] == n[1], view[i + 2] == n[2], view[i + 3] == n[3] { return i }
            i += 1
        }
        return nil
    }
}

/// `s` as a JSON string literal.
func jsonString(_ s: String) -> String {
    var r = "\""
    for u in s.unicodeScalars {
        switch u {
        case "\"": r += "\\\""
        case "\\": r += "\\\\"
        case "\n": r += "\\n"
        case _ where u.value < 0x20:
            r +=
                "\\u" + String(repeating: "0", count: 4 - String(u.value, radix: 16).count) + String(u.value, radix: 16)
        default: r.unicodeScalars.append(u)
        }
    }
    return r + "\""
}

/// Copies what one channel reads to its partner, with backpressure (a partner that cannot
/// take more stops this side reading) and half-closes passed on.
final class GlueHandler: ChannelDuplexHandler, @unchecked Sendable {
    typealias InboundIn = NIOAny
    typealias OutboundIn = NIOAny
    typealias OutboundOut = NIOAny

    private var partner: GlueHandler?
    private var context: ChannelHandlerContext?
    private var pendingRead = false

    static func pair() -> (GlueHandler, GlueHandler) {
        let a = GlueHandler(), b = GlueHandler()
        a.partner = b
        b.partner = a
        return (a, b)
    }

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
        partner = nil
    }

    private func partnerWrite(_ data: NIOAny) { context?.write(data, promise: nil) }
    private func partnerFlush() { context?.flush() }
    private func partnerWriteEOF() { context?.close(mode: .output, promise: nil) }
    private func partnerCloseFull() { context?.close(promise: nil) }
    private func partnerBecameWritable() {
        if pendingRead {
            pendingRead = false
            context?.read()
        }
    }
    private var partnerWritable: Bool { context?.channel.isWritable ?? false }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) { partner?.partnerWrite(data) }
    func channelReadComplete(context: ChannelHandlerContext) { partner?.partnerFlush() }
    func channelInactive(context: ChannelHandlerContext) { partner?.partnerCloseFull() }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let e = event as? ChannelEvent, case .inputClosed = e { partner?.partnerWriteEOF() }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) { context.close(promise: nil) }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable { partner?.partnerBecameWritable() }
    }

    func read(context: ChannelHandlerContext) {
        if let p = partner, p.partnerWritable { context.read() } else { pendingRead = true }
    }
}
