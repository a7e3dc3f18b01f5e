import Foundation
import FurcateCore
import GuestAgentProtocol

/// Freestyle's recursive `SnapshotSpec` (the `spec` of `POST /v1/snapshots`, the `snapshot` of a
/// `VmSpec`), decoded from its JSON as documented, and mapped onto a `BuildRecipe`: each spec is
/// one cacheable layer; `snapshot` nests the inner one. Fields that configure the VM rather than
/// the snapshot's contents (idle timeout, ready signal) are decoded for the API to apply to VMs
/// made from it; they are not part of the build. Exposed `ports` are refused (not supported).
public final class FreestyleSnapshotSpec: Codable, Sendable {
    public struct BaseImage: Codable, Sendable { public var dockerfileContent: String }
    public struct File: Codable, Sendable {
        public var content: String
        public var encoding: String?
        public var executable: Bool?
    }
    public struct GitRepository: Codable, Sendable {
        public var repo: String
        public var path: String
        public var rev: String?
    }
    public struct GitUser: Codable, Sendable {
        public var name: String?
        public var email: String?
        public var signingkey: String?
    }
    public struct GitConfig: Codable, Sendable { public var user: GitUser? }
    public struct GitOptions: Codable, Sendable {
        public var repos: [GitRepository]?
        /// System-wide git configuration, written to `/etc/gitconfig`; required (`{}` sets
        /// nothing), as the document says.
        public var config: GitConfig
    }
    public struct Systemd: Codable, Sendable {
        public var services: [ServiceSpec]?

        private struct Key: CodingKey {
            var stringValue: String
            var intValue: Int? { nil }
            init(stringValue: String) { self.stringValue = stringValue }
            init?(intValue: Int) { nil }
        }
        /// Unit fields of the document the agent does not honour: refused unless null, as on
        /// `POST …/systemd/services` (never silently ignored).
        static let unsupportedUnitFields = ["onFailure", "readySignal", "watchdogSec"]

        private enum CodingKeys: String, CodingKey { case services, patchedServices }

        public func encode(to encoder: any Encoder) throws {
            var c = encoder.container(keyedBy: CodingKeys.self)
            try c.encodeIfPresent(services, forKey: .services)
        }

        public init(from decoder: any Decoder) throws {
            let c = try decoder.container(keyedBy: CodingKeys.self)
            if c.contains(.patchedServices), try !c.decodeNil(forKey: .patchedServices) {
                throw DecodingError.dataCorruptedError(
                    forKey: .patchedServices, in: c,
                    debugDescription: "systemd.patchedServices is not supported: give whole units in systemd.services")
            }
            services = try c.decodeIfPresent([ServiceSpec].self, forKey: .services)
            guard var units = try? c.nestedUnkeyedContainer(forKey: .services) else { return }
            while !units.isAtEnd {
                let n = units.currentIndex
                let unit = try units.nestedContainer(keyedBy: Key.self)
                for f in Self.unsupportedUnitFields where unit.contains(Key(stringValue: f)) {
                    guard try unit.decodeNil(forKey: Key(stringValue: f)) else {
                        throw DecodingError.dataCorruptedError(
                            forKey: Key(stringValue: f), in: unit,
                            debugDescription: "systemd.services[\(n)].\(f) is not supported; leave it out or null")
                    }
                }
                // The document limits wantedBy to the agent's default.
                let wanted = Key(stringValue: "wantedBy")
                if unit.contains(wanted), try !unit.decodeNil(forKey: wanted),
                    try unit.decode([String].self, forKey: wanted) != ["multi-user.target"]
                {
                    throw DecodingError.dataCorruptedError(
                        forKey: wanted, in: unit,
                        debugDescription: "systemd.services[\(n)].wantedBy can only be [\"multi-user.target\"]")
                }
            }
        }
    }
    public struct PortMapping: Codable, Sendable {
        public var port: Int
        public var targetPort: Int
    }

    public let snapshot: FreestyleSnapshotSpec?
    public let snapshotId: String?
    public let baseImage: BaseImage?
    public let rootfsSizeGb: Int?
    public let memSizeGb: Int?
    public let vcpuCount: Int?
    public let workdir: String?
    public let systemd: Systemd?
    public let users: [UserSpec]?
    public let groups: [GroupSpec]?
    public let additionalFiles: [String: File]?
    public let git: GitOptions?
    public let aptDeps: [String]?
    public let discriminator: String?
    public let skipCache: Bool?
    public let idleTimeoutSeconds: Int?
    public let waitForReadySignal: Bool?
    public let readySignalTimeoutSeconds: Int?
    public let ports: [PortMapping]?

    /// Whether this layer describes contents of its own (files, users, services, packages,
    /// repositories, a working directory), not only a base.
    public var hasContents: Bool {
        workdir != nil || systemd != nil || users != nil || groups != nil || additionalFiles != nil || git != nil
            || aptDeps != nil
    }

    /// This layer over `inner` (its `snapshot`); nil keeps its own.
    public func over(_ inner: FreestyleSnapshotSpec?) -> FreestyleSnapshotSpec {
        FreestyleSnapshotSpec(self, snapshot: inner ?? snapshot)
    }

    private init(_ o: FreestyleSnapshotSpec, snapshot: FreestyleSnapshotSpec?) {
        self.snapshot = snapshot
        snapshotId = o.snapshotId
        baseImage = o.baseImage
        rootfsSizeGb = o.rootfsSizeGb
        memSizeGb = o.memSizeGb
        vcpuCount = o.vcpuCount
        workdir = o.workdir
        systemd = o.systemd
        users = o.users
        groups = o.groups
        additionalFiles = o.additionalFiles
        git = o.git
        aptDeps = o.aptDeps
        discriminator = o.discriminator
        skipCache = o.skipCache
        ports = o.ports
        idleTimeoutSeconds = o.idleTimeoutSeconds
        waitForReadySignal = o.waitForReadySignal
        readySignalTimeoutSeconds = o.readySignalTimeoutSeconds
    }

    /// The recipe for this layer (and its inner layers). `defaultBase` is used when the spec
    /// names no base (Furcate's default image).
    /// - Throws: `.invalidArgument` naming the field (two bases, a bad Dockerfile, bad base64,
    ///   sizes out of range, relative paths).
    public func recipe(defaultBase: BuildRecipe.Base) throws -> BuildRecipe {
        let bases = [snapshot != nil, snapshotId != nil, baseImage != nil].filter { $0 }.count
        guard bases <= 1 else {
            throw FurcateError(
                .invalidArgument, "snapshot, snapshotId and baseImage are mutually exclusive; give at most one")
        }
        var base: BuildRecipe.Base
        if let inner = snapshot {
            base = .recipe(try inner.recipe(defaultBase: defaultBase))
        } else if let id = snapshotId {
            base = .snapshot(id)
        } else if let b = baseImage {
            base = .recipe(try Dockerfile(parsing: b.dockerfileContent).recipe)
        } else {
            base = defaultBase
        }
        var steps: [BuildStep] = []
        if let apt = aptDeps, !apt.isEmpty { steps.append(.apt(apt)) }
        for g in groups ?? [] { steps.append(.group(g)) }
        for u in users ?? [] { steps.append(.user(u)) }
        for (path, f) in (additionalFiles ?? [:]).sorted(by: { $0.key < $1.key }) {
            let data: Data
            switch (f.encoding ?? "utf8").lowercased() {
            case "utf8", "utf-8": data = Data(f.content.utf8)
            case "base64":
                guard let d = Data(base64Encoded: f.content, options: .ignoreUnknownCharacters) else {
                    throw FurcateError(.invalidArgument, "additionalFiles[\(path)]: content is not valid base64")
                }
                data = d
            case let e:
                throw FurcateError(
                    .invalidArgument, "additionalFiles[\(path)]: encoding must be utf8 or base64, not '\(e)'")
            }
            steps.append(.file(path: path, content: data, executable: f.executable ?? false))
        }
        if let g = git, let config = try Self.gitconfig(g.config) {
            steps.append(.file(path: "/etc/gitconfig", content: Data(config.utf8), executable: false))
        }
        for r in git?.repos ?? [] { steps.append(.git(url: r.repo, path: r.path, rev: r.rev)) }
        for s in systemd?.services ?? [] { steps.append(.service(s)) }
        if let w = workdir { steps.append(.workdir(w)) }

        if let p = ports, !p.isEmpty {
            throw FurcateError(
                .invalidArgument, "ports: exposing guest ports is not supported yet; leave ports out or give []")
        }
        if let t = idleTimeoutSeconds, t < 0 {
            throw FurcateError(.invalidArgument, "idleTimeoutSeconds must not be negative")
        }
        if let t = readySignalTimeoutSeconds, !(0...3600).contains(t) {
            throw FurcateError(.invalidArgument, "readySignalTimeoutSeconds must be 0 to 3600")
        }
        if let g = rootfsSizeGb, !(1...16).contains(g) {
            throw FurcateError(.invalidArgument, "rootfsSizeGb must be 1 to 16, not \(g)")
        }
        if let c = vcpuCount, !(1...8).contains(c) {
            throw FurcateError(.invalidArgument, "vcpuCount must be 1 to 8, not \(c)")
        }
        var diskBytes = rootfsSizeGb.map { UInt64($0) << 30 }
        if let d = diskBytes, case .recipe(var inner) = base, case .image = inner.base {
            // The size belongs to the image layer underneath (the default image, a Dockerfile).
            inner.diskBytes = d
            base = .recipe(inner)
            diskBytes = nil
        }
        if let g = memSizeGb, !(1...8).contains(g) {
            throw FurcateError(.invalidArgument, "memSizeGb must be 1 to 8, not \(g)")
        }
        var r = BuildRecipe(
            base: base, steps: steps, vcpus: vcpuCount, memoryMiB: memSizeGb.map { $0 * 1024 }, diskBytes: diskBytes,
            discriminator: discriminator)
        r.skipCache = skipCache ?? false
        try r.validate()
        return r
    }

    /// `git.config` as the text of a git config file, or nil when it sets nothing. Values are
    /// quoted (backslash and double quote escaped); a line break in a value is refused, since
    /// git config has no way to hold one.
    static func gitconfig(_ c: GitConfig) throws -> String? {
        let user = [("name", c.user?.name), ("email", c.user?.email), ("signingkey", c.user?.signingkey)]
            .compactMap { k, v in v.map { (k, $0) } }
        guard !user.isEmpty else { return nil }
        var text = "[user]\n"
        for (key, value) in user {
            guard !value.contains(where: { $0.isNewline || $0 == "\0" }) else {
                throw FurcateError(.invalidArgument, "git.config.user.\(key) must be one line")
            }
            let quoted = value.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"")
            text += "\t\(key) = \"\(quoted)\"\n"
        }
        return text
    }
}
