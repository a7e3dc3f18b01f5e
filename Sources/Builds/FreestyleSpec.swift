import Foundation
import FurcateCore
import GuestAgentProtocol

/// Freestyle's recursive `SnapshotSpec` (the `spec` of `POST /v1/snapshots`, the `snapshot` of a
/// `VmSpec`), decoded from its JSON as documented, and mapped onto a `BuildRecipe`: each spec is
/// one cacheable layer; `snapshot` nests the inner one. Fields that configure the VM rather than
/// the snapshot's contents (idle timeout, ready signal) are decoded for the API to apply to VMs
/// made from it; they are not part of the build. Exposed `ports` are refused (not supported).
public final class FreestyleSnapshotSpec: Codable, Sendable {
    /// A base built from a Dockerfile (without a context).
    public struct BaseImage: Codable, Sendable {
        /// The Dockerfile's text.
        public var dockerfileContent: String
    }
    /// A file written into the snapshot (`additionalFiles`).
    public struct File: Codable, Sendable {
        /// The file's content, as `encoding` says.
        public var content: String
        /// `utf8` (the default) or `base64`.
        public var encoding: String?
        /// Made executable (mode 0755); nil: false.
        public var executable: Bool?
    }
    /// A repository cloned into the snapshot.
    public struct GitRepository: Codable, Sendable {
        /// The repository's URL.
        public var repo: String
        /// Where in the guest it is cloned.
        public var path: String
        /// The revision checked out; nil: the default branch.
        public var rev: String?
    }
    /// `git config user.*`, written into /etc/gitconfig.
    public struct GitUser: Codable, Sendable {
        /// `user.name`.
        public var name: String?
        /// `user.email`.
        public var email: String?
        /// `user.signingkey`.
        public var signingkey: String?
    }
    /// The system-wide git configuration.
    public struct GitConfig: Codable, Sendable {
        /// The `[user]` section.
        public var user: GitUser?
    }
    /// Repositories and git configuration of the snapshot.
    public struct GitOptions: Codable, Sendable {
        /// Repositories cloned, in order.
        public var repos: [GitRepository]?
        /// System-wide git configuration, written to `/etc/gitconfig`; required (`{}` sets
        /// nothing), as the document says.
        public var config: GitConfig
    }
    /// Systemd units of the snapshot (services, run by the agent where systemd is not the init).
    public struct Systemd: Codable, Sendable {
        /// The units, created (and enabled) in order.
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

        /// Encodes the services (the document's shape).
        public func encode(to encoder: any Encoder) throws {
            var c = encoder.container(keyedBy: CodingKeys.self)
            try c.encodeIfPresent(services, forKey: .services)
        }

        /// Decodes `services`, refusing unit fields the agent does not honour and a non-null
        /// `patchedServices`.
        /// - Throws: `DecodingError` naming the field.
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
    /// A guest port exposed on the host (refused: not supported).
    public struct PortMapping: Codable, Sendable {
        /// The port exposed.
        public var port: Int
        /// The guest port it reaches.
        public var targetPort: Int
    }

    /// The inner layer this one is built over.
    public let snapshot: FreestyleSnapshotSpec?
    /// An existing snapshot this layer is built over.
    public let snapshotId: String?
    /// A Dockerfile this layer is built over.
    public let baseImage: BaseImage?
    /// The rootfs size in GiB (1 to 16).
    public let rootfsSizeGb: Int?
    /// Guest RAM in GiB (1 to 8) of the build VM and the VMs made from the snapshot.
    public let memSizeGb: Int?
    /// vCPUs (1 to 8) of the build VM and the VMs made from the snapshot.
    public let vcpuCount: Int?
    /// The working directory commands run in, in VMs made from the snapshot.
    public let workdir: String?
    /// Systemd units.
    public let systemd: Systemd?
    /// Users added, after the groups.
    public let users: [UserSpec]?
    /// Groups added.
    public let groups: [GroupSpec]?
    /// Files written, by absolute path.
    public let additionalFiles: [String: File]?
    /// Repositories and git configuration.
    public let git: GitOptions?
    /// Debian packages installed first.
    public let aptDeps: [String]?
    /// Makes otherwise identical specs build separately (not cached together).
    public let discriminator: String?
    /// Build even when a cached snapshot exists.
    public let skipCache: Bool?
    /// The idle timeout of VMs made from the snapshot (not part of the build).
    public let idleTimeoutSeconds: Int?
    /// Whether creating a VM from it waits for its agent (not part of the build).
    public let waitForReadySignal: Bool?
    /// How long that wait may be, in seconds (not part of the build).
    public let readySignalTimeoutSeconds: Int?
    /// Exposed guest ports: refused when given (not supported).
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
