import Foundation
import FurcateCore
import GuestAgentProtocol
import Hypervisor
import Images
import Logging
import RecordStore
import VMService

/// Where a build is: waiting for an identical one or a slot, running, or done.
public enum BuildState: String, Codable, Sendable {
    case pending, running, succeeded, failed
}

/// Freestyle's `SnapshotStateTag` for the snapshot a build makes.
public enum SnapshotStateTag: String, Codable, Sendable {
    case building, ready, failed, cancelled, lost
}

/// One entry of a build's append-only timeline (Freestyle's BuildPhase). A phase ends when the
/// next one starts, or when the build finishes.
public struct BuildPhase: Codable, Sendable, Hashable {
    /// `bph-…`, unique.
    public var phaseId: String
    /// The build it belongs to.
    public var buildId: String
    /// What the phase does: `pull-image`, `boot`, a step's name, `snapshot`, `cached` (prefixed
    /// `layer N: ` in a build of several layers).
    public var name: String
    /// The snapshot the phase is about: the cached snapshot of a "cached" phase, the snapshot a
    /// "snapshot" phase made.
    public var snapshotId: String?
    /// When it started, Unix seconds.
    public var startedAt: Double
}

/// A layer a build materialized (built, or found cached): what later builds can reuse.
public struct LayerResult: Codable, Sendable, Hashable {
    /// The layer's template hash: what the cache is keyed by.
    public var templateHash: String
    /// The snapshot holding the layer.
    public var snapshotId: String
    /// Found in the cache rather than built.
    public var cached: Bool
}

/// A build (Freestyle's BuildRecord): state, planned phases, the phase timeline, the result.
public struct BuildRecord: Codable, Sendable {
    /// `bld-…`, unique.
    public var buildId: String
    /// The account that started it.
    public var account: String
    /// Pending, running, succeeded or failed.
    public var state: BuildState
    /// The outermost layer's template hash, once known.
    public var templateHash: String?
    /// Why it failed, for a person.
    public var failureReason: String?
    /// The phases it will go through, as planned at its start.
    public var plannedPhases: [String]
    /// The phases it went through so far, in order.
    public var phases: [BuildPhase]
    /// The layers it materialized so far, innermost first.
    public var layers: [LayerResult]
    /// The resulting snapshot (the outermost layer's).
    public var snapshotId: String?
    /// The build VM while one runs.
    public var buildVM: String?
    /// What it builds.
    public var recipe: BuildRecipe
    /// When it started, Unix seconds.
    public var startedAt: Double
    /// When its record last changed, Unix seconds.
    public var updatedAt: Double
    /// When it finished, Unix seconds.
    public var finishedAt: Double?
    /// Set when a restart interrupted the build (its snapshot state is `lost`).
    public var interrupted: Bool?

    /// The state of the snapshot this build produces (Freestyle's tags): building while it
    /// runs, ready once it succeeded, lost when a restart interrupted it, failed otherwise.
    public var snapshotState: SnapshotStateTag {
        switch state {
        case .pending, .running: return .building
        case .succeeded: return .ready
        case .failed: return interrupted == true ? .lost : .failed
        }
    }
}

/// What a build service is made with.
public struct BuildServiceOptions: Sendable {
    /// Where the build database lives.
    public var directory: String
    /// A build VM's vCPUs when its recipe names none.
    public var defaultVCPUs = 2
    /// A build VM's guest RAM in MiB when its recipe names none.
    public var defaultMemoryMiB = 512
    /// Each step's limit (apt installs can be slow).
    public var stepTimeout: Duration = .seconds(1800)
    /// How long a build VM's agent may take to answer after boot.
    public var bootTimeout: Duration = .seconds(120)
    /// Where the service logs (label `furcate.builds`).
    public var logger = Logger(label: "furcate.builds")

    /// Options keeping the build database in `directory`; the rest take the defaults above.
    public init(directory: String) { self.directory = directory }
}

/// Runs recipes in build VMs and snapshots the result; every layer is cached by its template
/// hash, identical concurrent requests share one build, and a restart marks interrupted builds
/// failed (never "succeeded").
public actor BuildService {
    /// Pulls the images recipes start from.
    public nonisolated let images: ImageService
    /// Runs the build VMs and keeps their snapshots.
    public nonisolated let vms: VMService
    /// What the service was made with.
    public nonisolated let options: BuildServiceOptions
    private let db: BuildDatabase
    private var records: [String: BuildRecord] = [:]
    private var tasks: [String: Task<Void, Never>] = [:]
    /// Template hash → snapshot id, from every materialized layer.
    private var cache: [String: String] = [:]
    /// Outer template hash (or recipe identity) → running build, to share identical requests.
    private var inflight: [BuildRecipe: String] = [:]

    /// Opens (creating) the build database.
    /// - Throws: `.io` when it cannot be used.
    public init(images: ImageService, vms: VMService, options: BuildServiceOptions) throws {
        self.images = images
        self.vms = vms
        self.options = options
        try FileManager.default.createDirectory(atPath: options.directory, withIntermediateDirectories: true)
        db = try BuildDatabase(path: options.directory + "/builds.sqlite")
        for r in try db.all() {
            records[r.buildId] = r
            for l in r.layers { cache[l.templateHash] = l.snapshotId }
        }
    }

    /// After a restart: builds that were pending or running failed (their VM is deleted).
    /// Returns their ids.
    @discardableResult
    public func recover() async -> [String] {
        var out: [String] = []
        for var r in records.values where r.state == .pending || r.state == .running {
            if let vm = r.buildVM { try? await vms.delete(vm) }
            let last = r.phases.last?.name ?? "start"
            r.state = .failed
            r.failureReason = "interrupted: the server stopped during the build (in phase \(last))"
            r.interrupted = true
            r.buildVM = nil
            let now = Date().timeIntervalSince1970
            r.finishedAt = now
            r.updatedAt = now
            save(r)
            out.append(r.buildId)
        }
        return out
    }

    /// Build `id`'s record.
    /// - Throws: `.notFound` for an unknown id.
    public func record(_ id: String) throws -> BuildRecord {
        guard let r = records[id] else { throw FurcateError(.notFound, "no build \(id.prefix(60))") }
        return r
    }

    /// The builds of `account` (every account's when nil), oldest first.
    public func list(account: String? = nil) -> [BuildRecord] {
        records.values.filter { account == nil || $0.account == account }.sorted { $0.startedAt < $1.startedAt }
    }

    /// The snapshot cached for a template hash, if it still exists.
    public func cachedSnapshot(_ templateHash: String) async -> String? {
        guard let s = cache[templateHash] else { return nil }
        return (try? await vms.snapshotInfo(s)) != nil ? s : nil
    }

    /// Starts a build in the background and returns its record (pending). An identical recipe
    /// already building returns that build instead.
    /// - Throws: `.invalidArgument` for a recipe that cannot be valid.
    public func start(_ recipe: BuildRecipe, account: String = "default", credentials: RegistryCredentials? = nil)
        throws -> BuildRecord
    {
        try recipe.validate()
        if let running = inflight[recipe], let r = records[running], r.account == account { return r }
        let id = "bld-" + VMID.newVM()
        let now = Date().timeIntervalSince1970
        let r = BuildRecord(
            buildId: id, account: account, state: .pending, templateHash: nil, failureReason: nil,
            plannedPhases: Self.plan(recipe), phases: [], layers: [], snapshotId: nil, buildVM: nil, recipe: recipe,
            startedAt: now, updatedAt: now, finishedAt: nil, interrupted: nil)
        save(r)
        inflight[recipe] = id
        tasks[id] = Task { await self.run(id, recipe, credentials: credentials) }
        return r
    }

    /// Waits for a build to finish and returns its record (succeeded or failed).
    public func wait(_ id: String) async throws -> BuildRecord {
        _ = try record(id)
        if let t = tasks[id] { await t.value }
        return try record(id)
    }

    /// Builds and waits: the record of a finished build. A failed build is returned, not thrown.
    public func build(_ recipe: BuildRecipe, account: String = "default", credentials: RegistryCredentials? = nil)
        async throws -> BuildRecord
    {
        let r = try start(recipe, account: account, credentials: credentials)
        return try await wait(r.buildId)
    }

    /// The recipe of the default image's ready snapshot: the Debian 12 systemd rootfs booted
    /// once, snapshotted when systemd reports it is up, so later VMs fork from it.
    public static func defaultImageRecipe(rootfsTarball: String) -> BuildRecipe {
        BuildRecipe(
            base: .image("rootfs:" + rootfsTarball),
            steps: [
                .run(
                    command:
                        "for i in $(seq 1 1200); do [ -S /run/systemd/private ] && break; sleep 0.1; done; systemctl is-system-running --wait >/dev/null || true"
                )
            ],
            memoryMiB: 512)
    }

    /// The default image's ready snapshot, built on first use and cached after: its id.
    /// - Throws: `.notFound` when the tarball is missing (scripts/guest-artifacts.sh builds
    ///   it), `.buildFailed` with the build's reason.
    public func defaultSnapshot(rootfsTarball: String) async throws -> String {
        guard FileManager.default.isReadableFile(atPath: rootfsTarball) else {
            throw FurcateError(
                .notFound,
                "the default image \(rootfsTarball) is missing (scripts/guest-artifacts.sh builds it with mmdebstrap)")
        }
        let r = try await build(Self.defaultImageRecipe(rootfsTarball: rootfsTarball))
        guard r.state == .succeeded, let s = r.snapshotId else {
            throw FurcateError(
                .buildFailed, "building the default image failed: \(r.failureReason ?? "unknown reason")")
        }
        return s
    }

    /// The phases a recipe will go through if nothing is cached.
    static func plan(_ recipe: BuildRecipe) -> [String] {
        let layers = recipe.layers
        var out: [String] = []
        for (i, l) in layers.enumerated() {
            let prefix = layers.count > 1 ? "layer \(i + 1): " : ""
            if case .image = l.base { out.append(prefix + "pull-image") }
            out.append(prefix + "boot")
            out += l.steps.map { prefix + $0.phaseName }
            out.append(prefix + "snapshot")
        }
        return out
    }

    // MARK: running

    private func save(_ r: BuildRecord) {
        records[r.buildId] = r
        do { try db.save(r) } catch {
            options.logger.error(
                "cannot save a build record", metadata: ["build.id": "\(r.buildId)", "error": "\(error)"])
        }
    }

    private func update(_ id: String, _ change: (inout BuildRecord) -> Void) {
        guard var r = records[id] else { return }
        change(&r)
        r.updatedAt = Date().timeIntervalSince1970
        save(r)
    }

    private func phase(_ id: String, _ name: String, snapshot: String? = nil) {
        update(id) {
            $0.phases.append(
                BuildPhase(
                    phaseId: "bph-" + VMID.newVM(), buildId: id, name: name, snapshotId: snapshot,
                    startedAt: Date().timeIntervalSince1970))
        }
        options.logger.info("build phase", metadata: ["build.id": "\(id)", "phase": "\(name)"])
    }

    private func run(_ id: String, _ recipe: BuildRecipe, credentials: RegistryCredentials?) async {
        update(id) { $0.state = .running }
        do {
            let layers = recipe.layers
            var base: (snapshot: String, hash: String)?
            for (i, layer) in layers.enumerated() {
                let prefix = layers.count > 1 ? "layer \(i + 1): " : ""
                base = try await materialize(id, layer, on: base, prefix: prefix, credentials: credentials)
            }
            guard let result = base else { throw FurcateError(.invalidArgument, "the recipe has no layers") }
            update(id) {
                $0.state = .succeeded
                $0.snapshotId = result.snapshot
                $0.templateHash = result.hash
                $0.finishedAt = Date().timeIntervalSince1970
            }
        } catch {
            let reason = (error as? FurcateError)?.description ?? "\(error)"
            update(id) {
                $0.state = .failed
                $0.failureReason = reason
                $0.finishedAt = Date().timeIntervalSince1970
            }
            options.logger.warning("build failed", metadata: ["build.id": "\(id)", "reason": "\(reason)"])
        }
        inflight[recipe] = nil
        tasks[id] = nil
    }

    /// Builds one layer on `base` (the inner layer's result), or finds it cached.
    private func materialize(
        _ id: String, _ layer: BuildRecipe, on base: (snapshot: String, hash: String)?, prefix: String,
        credentials: RegistryCredentials?
    ) async throws -> (snapshot: String, hash: String) {
        let baseIdentity: String
        var boot = CreateVMRequest()
        switch layer.base {
        case .image(let ref):
            phase(id, prefix + "pull-image")
            let img = try await images.pull(ref, credentials: credentials, diskBytes: layer.diskBytes)
            baseIdentity = "image:" + img.storeFile
            boot.image = img.storeFile
            boot.memoryMiB = layer.memoryMiB ?? options.defaultMemoryMiB
            boot.vcpus = layer.vcpus ?? options.defaultVCPUs
        case .snapshot(let s):
            _ = try await vms.snapshotInfo(s)
            baseIdentity = "snapshot:" + s
            boot.snapshot = s
            boot.memoryMiB = layer.memoryMiB
        case .recipe:
            guard let base else { throw FurcateError(.internalError, "a layer's inner layer was not built first") }
            baseIdentity = "layer:" + base.hash
            boot.snapshot = base.snapshot
            boot.memoryMiB = layer.memoryMiB
        }
        let hash = layer.templateHash(baseIdentity: baseIdentity)
        if !layer.skipCache, let cached = await cachedSnapshot(hash) {
            phase(id, prefix + "cached", snapshot: cached)
            update(id) { $0.layers.append(LayerResult(templateHash: hash, snapshotId: cached, cached: true)) }
            return (cached, hash)
        }
        phase(id, prefix + "boot")
        let vm = try await vms.create(boot)
        update(id) { $0.buildVM = vm.id }
        do {
            let agent = try await vms.agent(vm.id, timeout: options.bootTimeout)
            let runner = StepRunner(agent: agent, timeout: options.stepTimeout)
            for step in layer.steps {
                phase(id, prefix + step.phaseName)
                try await runner.run(step)
            }
            phase(id, prefix + "snapshot")
            try await agent.sync()
            let snap = try await vms.snapshot(vm.id)
            update(id) {
                $0.phases[$0.phases.count - 1].snapshotId = snap.id
                $0.layers.append(LayerResult(templateHash: hash, snapshotId: snap.id, cached: false))
                $0.buildVM = nil
            }
            cache[hash] = snap.id
            try? await vms.delete(vm.id)
            return (snap.id, hash)
        } catch {
            try? await vms.delete(vm.id)
            update(id) { $0.buildVM = nil }
            throw error
        }
    }
}

/// Runs build steps through a build VM's agent.
struct StepRunner {
    let agent: AgentClient
    let timeout: Duration

    func run(_ step: BuildStep) async throws {
        switch step {
        case .run(let command, let shell, let user, let workdir, let env):
            try await sh(command, shell: shell, user: user, cwd: workdir, env: env, what: "RUN \(command.prefix(120))")
        case .apt(let pkgs):
            try await sh(
                """
                command -v apt-get >/dev/null 2>&1 || { echo "this image has no apt-get (it is not Debian-based)" >&2; exit 127; }
                export DEBIAN_FRONTEND=noninteractive
                apt-get update -q && apt-get install -y -q --no-install-recommends \(pkgs.map(quote).joined(separator: " ")) && apt-get clean && rm -rf /var/lib/apt/lists/*
                """, what: "apt install \(pkgs.joined(separator: " "))")
        case .pip(let pkgs):
            try await sh(
                """
                if command -v pip >/dev/null 2>&1; then P=pip; elif command -v pip3 >/dev/null 2>&1; then P=pip3
                else echo "this image has no pip (add python3-pip to the apt packages)" >&2; exit 127; fi
                PIP_BREAK_SYSTEM_PACKAGES=1 $P install --no-cache-dir --disable-pip-version-check \(pkgs.map(quote).joined(separator: " "))
                """, what: "pip install \(pkgs.joined(separator: " "))")
        case .npm(let pkgs):
            try await sh(
                """
                command -v npm >/dev/null 2>&1 || { echo "this image has no npm (add nodejs and npm to the apt packages)" >&2; exit 127; }
                npm install -g \(pkgs.map(quote).joined(separator: " "))
                """, what: "npm install \(pkgs.joined(separator: " "))")
        case .git(let url, let path, let rev):
            try await sh(
                """
                if ! command -v git >/dev/null 2>&1; then
                  command -v apt-get >/dev/null 2>&1 || { echo "this image has no git (and no apt-get to install it)" >&2; exit 127; }
                  DEBIAN_FRONTEND=noninteractive apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends git ca-certificates || exit 1
                fi
                rm -rf \(quote(path)) && mkdir -p "$(dirname \(quote(path)))" && git clone -q -- \(quote(url)) \(quote(path))\(rev.map { " && cd \(quote(path)) && git checkout -q \(quote($0))" } ?? "")
                """, what: "git clone \(url)")
        case .file(let path, let content, let executable):
            try await agent.writeFile(path, content, mode: executable ? 0o755 : 0o644, timeout: .seconds(120))
        case .env(let vars):
            try await agent.setEnvironment(vars)
        case .workdir(let w):
            try await agent.makeDirectory(w)
            try await agent.writeFile("/.furcate/workdir", Data((w + "\n").utf8), mode: 0o644)
        case .group(let g):
            try await agent.addGroup(g)
        case .user(let u):
            try await agent.addUser(u)
        case .service(let s):
            try await agent.createService(s)
        }
    }

    private func sh(
        _ script: String, shell: [String]? = nil, user: String? = nil, cwd: String? = nil, env: [String: String]? = nil,
        what: String
    ) async throws {
        let ms = Int(timeout.components.seconds * 1000)
        var req = shell.map { ExecRequest(argv: $0 + [script]) } ?? ExecRequest(command: script)
        req.user = user
        req.cwd = cwd
        req.env = env
        req.timeoutMs = ms
        req.maxOutputBytes = 64 << 10
        let r = try await agent.exec(req)
        if r.timedOut { throw FurcateError(.buildFailed, "\(what) did not finish within \(ms / 1000) s") }
        guard r.exitCode == 0 else {
            let out = String(decoding: (r.stderr.isEmpty ? r.stdout : r.stderr).suffix(1500), as: UTF8.self)
                .trimmingCharacters(in: .whitespacesAndNewlines)
            let how = r.exitCode.map { "exit status \($0)" } ?? "signal \(r.signal ?? 0)"
            throw FurcateError(.buildFailed, "\(what) failed (\(how)): \(out)")
        }
    }

    private func quote(_ s: String) -> String { Dockerfile.shellQuote(s) }
}

/// The build table: one JSON record per build (RecordStore).
final class BuildDatabase: Sendable {
    private let db: RecordDatabase
    private static let table = RecordTable("builds")

    init(path: String) throws {
        db = try RecordDatabase(
            path: path, what: "build", migrations: ["CREATE TABLE builds (id TEXT PRIMARY KEY, record BLOB NOT NULL)"])
    }

    func save(_ r: BuildRecord) throws { try db.save(Self.table, key: r.buildId, r) }
    func all() throws -> [BuildRecord] { try db.all(Self.table) }
}
