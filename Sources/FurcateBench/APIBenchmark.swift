import APIServer
import Accounts
import AsyncHTTPClient
import Builds
import Foundation
import FurcateCore
import FurcateEngine
import Hummingbird
import Images
import NIOCore
import VMService

/// Results of `furcate bench api`: a fork through the HTTP API against the same fork through
/// the library in the same run, and `wrk` on `GET /v1/vms` with many VM records against the
/// same request for an account with none.
public struct APIBenchReport: Codable, Sendable {
    /// KVM or TCG, as the run used.
    public var accelerator: String
    /// Forks made over each path.
    public var forkCount: Int
    /// `POST /v1/vms/{id}/fork {"count":1}`, request to response.
    public var httpForkP50Millis: Double
    /// The same, 99th percentile.
    public var httpForkP99Millis: Double
    /// `VMService.fork(id, count: 1, newIdentity: true)`, the same work without HTTP.
    public var libraryForkP50Millis: Double
    /// The same, 99th percentile.
    public var libraryForkP99Millis: Double
    /// HTTP p50 / library p50.
    public var forkOverheadRatio: Double
    /// Forks (of both paths) whose guest agent answered afterwards.
    public var forksVerified: Int
    /// VMs the listing account owns during the wrk run.
    public var records: Int
    /// How long wrk ran against each account.
    public var wrkSeconds: Int
    /// wrk's connections.
    public var wrkConnections: Int
    /// `GET /v1/vms` requests per second with `records` VMs.
    public var listRequestsPerSecond: Double
    /// Their 99th-percentile latency.
    public var listP99Millis: Double
    /// Non-2xx answers and socket errors wrk counted.
    public var listErrors: Int
    /// The baseline: the same request by an account with no VMs.
    public var emptyListRequestsPerSecond: Double
    /// Its 99th-percentile latency.
    public var emptyListP99Millis: Double
    /// list / empty list requests per second.
    public var listThroughputRatio: Double
    /// The whole run's wall time.
    public var seconds = 0.0
}

/// `furcate bench api`: needs root, QEMU, the guest artifacts and `wrk`.
public struct APIBenchmark: Sendable {
    /// Where the run keeps its store, mount and data (removed afterwards).
    public var workDir: String
    /// The guest kernel, initramfs and test rootfs.
    public var guestDir: String
    /// Forks made over each path.
    public var forkCount: Int
    /// VMs the listing account owns.
    public var records: Int
    /// How long wrk runs against each account.
    public var wrkSeconds: Int
    /// wrk's connections.
    public var wrkConnections = 8
    /// Called with a line for each step.
    public var progress: @Sendable (String) -> Void

    /// A run with the given settings; the rest take the defaults above.
    public init(
        workDir: String, guestDir: String, forkCount: Int = 20, records: Int = 1000, wrkSeconds: Int = 5,
        progress: @escaping @Sendable (String) -> Void
    ) {
        self.workDir = workDir
        self.guestDir = guestDir
        self.forkCount = forkCount
        self.records = records
        self.wrkSeconds = wrkSeconds
        self.progress = progress
    }

    /// `wrk` on the PATH, or where Debian puts it.
    static func wrkPath() throws -> String {
        for dir in (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin").split(separator: ":") + ["/usr/bin"] {
            let p = "\(dir)/wrk"
            if FileManager.default.isExecutableFile(atPath: p) { return p }
        }
        throw FurcateError(.notFound, "bench api needs wrk (apt-get install wrk)")
    }

    /// Runs the benchmark.
    /// - Throws: when a facility it needs is missing (root, QEMU, wrk) or a step fails.
    public func run() async throws -> APIBenchReport {
        let wrk = try Self.wrkPath()
        var (r, seconds) = try await VMBenchEnvironment.run(
            workDir: workDir, guestDir: guestDir, name: "api",
            configure: {
                $0.defaultMemoryMiB = 128
                $0.debugShell = false
            }
        ) { try await measure($0, wrk: wrk) }
        r.seconds = seconds
        return r
    }

    private func measure(_ env: VMBenchEnvironment, wrk: String) async throws -> APIBenchReport {
        let svc = env.service
        let images = try ImageService(
            store: env.store,
            options: ImageServiceOptions(directory: env.root + "/images", agentPath: guestDir + "/furcate-agent"))
        let builds = try BuildService(
            images: images, vms: svc, options: BuildServiceOptions(directory: env.root + "/builds"))
        let keys = try KeyStore(path: env.root + "/keys.sqlite")
        let key = try keys.create(account: "bench").secret
        let emptyKey = try keys.create(account: "empty").secret
        var engine = Engine(
            vms: svc, images: images, builds: builds, keys: keys,
            owners: try OwnerStore(path: env.root + "/owners.sqlite"),
            defaultImage: env.root + "/no-default-image.tar")
        engine.defaultIdleTimeoutSeconds = 0
        let api = engine

        let port = PortBox()
        let app = Application(
            router: APIServer.router(api),
            configuration: .init(address: .hostname("127.0.0.1", port: 0), serverName: "furcate-bench"),
            onServerRunning: { await port.set($0.localAddress?.port ?? 0) })
        let server = Task { try await app.runService(gracefulShutdownSignals: []) }
        let http = HTTPClient(eventLoopGroupProvider: .singleton)
        do {
            let r = try await measure(
                engine: api, port: try await port.wait(), key: key, emptyKey: emptyKey, http: http, wrk: wrk)
            try await http.shutdown()
            server.cancel()
            _ = await server.result
            return r
        } catch {
            try? await http.shutdown()
            server.cancel()
            _ = await server.result
            throw error
        }
    }

    private func measure(engine: Engine, port: Int, key: String, emptyKey: String, http: HTTPClient, wrk: String)
        async throws -> APIBenchReport
    {
        let svc = engine.vms
        progress("boot the parent VM")
        let parent = try await svc.create(CreateVMRequest(image: "rootfs"))
        _ = try await svc.agent(parent.id, timeout: .seconds(120))
        try engine.owners.set(parent.id, account: "bench")

        progress("fork \(forkCount)× over HTTP and \(forkCount)× through the library, alternating")
        var httpMillis: [Double] = []
        var libMillis: [Double] = []
        var verified = 0
        func verify(_ id: String) async {
            if (try? await svc.agent(id, timeout: .seconds(60)).exec(.init(argv: ["true"])))?.exitCode == 0 {
                verified += 1
            }
            try? await svc.delete(id)
        }
        for _ in 0..<forkCount {
            var req = HTTPClientRequest(url: "http://127.0.0.1:\(port)/v1/vms/\(parent.id)/fork")
            req.method = .POST
            req.headers.add(name: "Authorization", value: "Bearer " + key)
            req.headers.add(name: "Content-Type", value: "application/json")
            req.body = .bytes(ByteBuffer(string: #"{"count":1}"#))
            let a = ContinuousClock.now
            let resp = try await http.execute(req, timeout: .seconds(120))
            let body = try await resp.body.collect(upTo: 1 << 20)
            httpMillis.append(millis(ContinuousClock.now - a))
            guard resp.status == .ok,
                let obj = try? JSONSerialization.jsonObject(with: Data(buffer: body)) as? [String: Any],
                let forks = obj["forks"] as? [[String: Any]], let id = forks.first?["id"] as? String
            else {
                throw FurcateError(
                    .io, "fork over HTTP answered \(resp.status.code): \(String(buffer: body).prefix(300))")
            }
            await verify(id)

            let b = ContinuousClock.now
            let f = try await svc.fork(parent.id, count: 1, newIdentity: true)
            libMillis.append(millis(ContinuousClock.now - b))
            await verify(f.vms[0].id)
        }

        progress("make \(records) stopped VM records (disks cloned from a snapshot of the parent)")
        let base = try await svc.snapshot(parent.id)
        for _ in 0..<records {
            try engine.owners.set(try await svc.createStopped(fromSnapshot: base.id).id, account: "bench")
        }
        let listed = try await listCount(http: http, port: port, key: key)
        guard listed == records + 1 else {
            throw FurcateError(.io, "GET /v1/vms listed \(listed) VMs, not \(records + 1)")
        }

        progress("wrk GET /v1/vms: \(records + 1) VMs, then an account with none (baseline)")
        let full = try Self.wrk(
            wrk, url: "http://127.0.0.1:\(port)/v1/vms", key: key, seconds: wrkSeconds, connections: wrkConnections)
        let empty = try Self.wrk(
            wrk, url: "http://127.0.0.1:\(port)/v1/vms", key: emptyKey, seconds: wrkSeconds, connections: wrkConnections
        )

        let p50 = { (xs: [Double]) in StoreBenchmark.percentile(xs, 0.5) }
        let p99 = { (xs: [Double]) in StoreBenchmark.percentile(xs, 0.99) }
        return APIBenchReport(
            accelerator: svc.options.accelerator.rawValue, forkCount: forkCount, httpForkP50Millis: p50(httpMillis),
            httpForkP99Millis: p99(httpMillis),
            libraryForkP50Millis: p50(libMillis), libraryForkP99Millis: p99(libMillis),
            forkOverheadRatio: p50(httpMillis) / p50(libMillis),
            forksVerified: verified, records: records + 1, wrkSeconds: wrkSeconds, wrkConnections: wrkConnections,
            listRequestsPerSecond: full.rps, listP99Millis: full.p99Millis, listErrors: full.errors,
            emptyListRequestsPerSecond: empty.rps, emptyListP99Millis: empty.p99Millis,
            listThroughputRatio: full.rps / empty.rps)
    }

    private func listCount(http: HTTPClient, port: Int, key: String) async throws -> Int {
        var req = HTTPClientRequest(url: "http://127.0.0.1:\(port)/v1/vms?limit=1")
        req.headers.add(name: "Authorization", value: "Bearer " + key)
        let resp = try await http.execute(req, timeout: .seconds(60))
        let body = try await resp.body.collect(upTo: 1 << 20)
        return ((try? JSONSerialization.jsonObject(with: Data(buffer: body))) as? [String: Any])?["totalCount"] as? Int
            ?? -1
    }

    struct WrkResult {
        var rps: Double
        var p99Millis: Double
        var errors: Int
    }

    /// Runs wrk with its latency distribution and reads requests/s, p99 and errors (non-2xx
    /// responses and socket errors) from its report.
    static func wrk(_ wrk: String, url: String, key: String, seconds: Int, connections: Int) throws -> WrkResult {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: wrk)
        p.arguments = [
            "-t", "2", "-c", "\(connections)", "-d", "\(seconds)s", "--latency", "-H", "Authorization: Bearer \(key)",
            url,
        ]
        let out = Pipe()
        p.standardOutput = out
        p.standardError = out
        try p.runWithSignalsUnblocked()
        let data = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        let text = String(decoding: data, as: UTF8.self)
        guard p.terminationStatus == 0 else {
            throw FurcateError(.io, "wrk failed (\(p.terminationStatus)): \(text.suffix(300))")
        }
        return try parseWrk(text)
    }

    /// wrk's report: `Requests/sec: 1234.56`, `99%  12.34ms` under the latency distribution,
    /// `Non-2xx or 3xx responses: N`, `Socket errors: connect A, read B, write C, timeout D`.
    static func parseWrk(_ text: String) throws -> WrkResult {
        var rps: Double?
        var p99: Double?
        var errors = 0
        for raw in text.split(separator: "\n") {
            let line = raw.trimmingCharacters(in: .whitespaces)
            let fields = line.split(whereSeparator: { $0 == " " || $0 == "\t" || $0 == "," }).map(String.init)
            if line.hasPrefix("Requests/sec:"), fields.count >= 2 { rps = Double(fields[1]) }
            if fields.count == 2, fields[0] == "99%" { p99 = durationMillis(fields[1]) }
            if line.hasPrefix("Non-2xx or 3xx responses:"), let n = fields.last.flatMap({ Int($0) }) { errors += n }
            if line.hasPrefix("Socket errors:") {
                errors += fields.compactMap { Int($0) }.reduce(0, +)
            }
        }
        guard let rps, let p99 else { throw FurcateError(.io, "could not read wrk's report: \(text.prefix(400))") }
        return WrkResult(rps: rps, p99Millis: p99, errors: errors)
    }

    /// `850.00us`, `12.34ms`, `1.20s`, `2.00m` in milliseconds.
    static func durationMillis(_ s: String) -> Double? {
        for (unit, scale) in [("us", 0.001), ("ms", 1.0), ("s", 1000.0), ("m", 60_000.0)] where s.hasSuffix(unit) {
            if let v = Double(s.dropLast(unit.count)) { return v * scale }
        }
        return nil
    }
}

/// The server's port, known once it listens.
private actor PortBox {
    private var port: Int?
    private var waiters: [CheckedContinuation<Int, Never>] = []

    func set(_ p: Int) {
        port = p
        for w in waiters { w.resume(returning: p) }
        waiters = []
    }

    func wait() async throws -> Int {
        if let port { return port }
        let p = await withCheckedContinuation { waiters.append($0) }
        guard p > 0 else { throw FurcateError(.io, "the benchmark's HTTP server did not report its port") }
        return p
    }
}
