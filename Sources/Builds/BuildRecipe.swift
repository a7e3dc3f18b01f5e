// Builds: recipes (InstaVM build args, Freestyle snapshot specs, Dockerfiles) run in a build VM
// through the guest agent, ending in a VM snapshot cached by template hash. Neighbours: Images
// (the base rootfs) and VMService (the build VM, its snapshot) below; the API server above.
import Crypto
import Foundation
import FurcateCore
import GuestAgentProtocol

/// What a build starts from and what it does, in order. Every API shape maps onto this.
public struct BuildRecipe: Codable, Hashable, Sendable {
    /// What a build starts from.
    public indirect enum Base: Codable, Hashable, Sendable {
        /// An OCI image reference (pulled, turned into a rootfs, booted).
        case image(String)
        /// An existing VM snapshot (`sc-…`), restored.
        case snapshot(String)
        /// An inner layer, built (or found cached) first; its snapshot is this layer's base.
        case recipe(BuildRecipe)
    }

    /// What the build starts from.
    public var base: Base
    /// What it does, in order, through the build VM's agent.
    public var steps: [BuildStep]
    /// The build VM's vCPUs (and its snapshot's); nil: the service's default.
    public var vcpus: Int?
    /// The build VM's guest RAM in MiB (and its snapshot's); nil: the service's default.
    public var memoryMiB: Int?
    /// The rootfs size (image bases only; nil: automatic).
    public var diskBytes: UInt64?
    /// Makes otherwise identical recipes hash differently (Freestyle's `discriminator`).
    public var discriminator: String?
    /// Build this layer even when a snapshot with its template hash exists; the new snapshot
    /// becomes the cache entry. Not part of the hash.
    public var skipCache = false

    /// A recipe with the given fields; nil ones take the defaults documented on each.
    public init(
        base: Base, steps: [BuildStep] = [], vcpus: Int? = nil, memoryMiB: Int? = nil, diskBytes: UInt64? = nil,
        discriminator: String? = nil
    ) {
        self.base = base
        self.steps = steps
        self.vcpus = vcpus
        self.memoryMiB = memoryMiB
        self.diskBytes = diskBytes
        self.discriminator = discriminator
    }

    /// The layers from the innermost out (this recipe last).
    var layers: [BuildRecipe] {
        if case .recipe(let inner) = base { return inner.layers + [self] }
        return [self]
    }

    /// Checks what can be checked before anything runs.
    /// - Throws: `.invalidArgument` naming the field.
    public func validate() throws {
        if let v = vcpus, !(1...8).contains(v) {
            throw FurcateError(.invalidArgument, "vCPU count must be 1 to 8, not \(v)")
        }
        if let m = memoryMiB, !(128...8192).contains(m) {
            throw FurcateError(.invalidArgument, "memory must be 128 to 8192 MB, not \(m)")
        }
        if let d = diskBytes {
            guard (1 << 30...16 << 30).contains(d) else {
                throw FurcateError(.invalidArgument, "disk size must be 1 to 16 GB")
            }
            guard case .image = base else {
                throw FurcateError(
                    .invalidArgument,
                    "a disk size applies to a layer built from an image, not to one built on a snapshot")
            }
        }
        switch base {
        case .image(let r):
            guard !r.isEmpty else { throw FurcateError(.invalidArgument, "the base image reference is empty") }
        case .snapshot(let s):
            guard !s.isEmpty else { throw FurcateError(.invalidArgument, "the base snapshot id is empty") }
        case .recipe(let inner): try inner.validate()
        }
        for s in steps { try s.validate() }
    }

    /// The template hash of this layer given its base's identity (an image digest, a snapshot
    /// id, or the inner layer's hash): sha256 of the canonical JSON of base, steps and sizes.
    func templateHash(baseIdentity: String) -> String {
        struct Key: Encodable {
            var base: String
            var steps: [BuildStep]
            var vcpus: Int?
            var memoryMiB: Int?
            var diskBytes: UInt64?
            var discriminator: String?
        }
        let enc = JSONEncoder()
        enc.outputFormatting = [.sortedKeys]
        let key = Key(
            base: baseIdentity, steps: steps, vcpus: vcpus, memoryMiB: memoryMiB, diskBytes: diskBytes,
            discriminator: discriminator)
        let data = (try? enc.encode(key)) ?? Data()
        return SHA256.hash(data: data).map { String(format: "%02x", $0) }.joined()
    }
}

/// One thing a build does in the build VM.
public enum BuildStep: Codable, Hashable, Sendable {
    /// A shell command (`/bin/sh -c`, or `shell` + command), as `user`, in `workdir`.
    case run(
        command: String, shell: [String]? = nil, user: String? = nil, workdir: String? = nil,
        env: [String: String]? = nil)
    case apt([String])
    case pip([String])
    case npm([String])
    /// Clone `url` into `path`, at `rev` (branch, tag or commit) when given.
    case git(url: String, path: String, rev: String?)
    case file(path: String, content: Data, executable: Bool)
    /// Added to the environment of every process started in the VM and its snapshots' VMs.
    case env([String: String])
    /// Where exec starts by default in the VM and its snapshots' VMs.
    case workdir(String)
    case group(GroupSpec)
    case user(UserSpec)
    /// A service created and started by the guest's supervisor (or systemd).
    case service(ServiceSpec)

    /// The phase a step is reported as.
    var phaseName: String {
        switch self {
        case .run: return "run"
        case .apt: return "apt-install"
        case .pip: return "pip-install"
        case .npm: return "npm-install"
        case .git: return "git-clone"
        case .file: return "write-files"
        case .env: return "set-env"
        case .workdir: return "set-workdir"
        case .group: return "create-groups"
        case .user: return "create-users"
        case .service: return "create-services"
        }
    }

    func validate() throws {
        func packages(_ ps: [String], _ what: String) throws {
            guard !ps.isEmpty else { throw FurcateError(.invalidArgument, "an empty list of \(what) packages") }
            for p in ps
            where p.isEmpty || p.utf8.count > 214
                || p.contains(where: { $0.isWhitespace || $0.asciiValue.map { $0 < 32 } ?? false }) || p.hasPrefix("-")
            {
                throw FurcateError(.invalidArgument, "'\(p.prefix(80))' is not a \(what) package name")
            }
        }
        func absolute(_ p: String, _ what: String) throws {
            guard p.hasPrefix("/"), !p.split(separator: "/").contains(".."), !p.contains("\0") else {
                throw FurcateError(.invalidArgument, "\(what) '\(p.prefix(200))' must be an absolute path without '..'")
            }
        }
        switch self {
        case .run(let c, _, _, let w, _):
            guard !c.isEmpty else { throw FurcateError(.invalidArgument, "an empty command") }
            if let w { try absolute(w, "working directory") }
        case .apt(let p): try packages(p, "apt")
        case .pip(let p): try packages(p, "pip")
        case .npm(let p): try packages(p, "npm")
        case .git(let url, let path, let rev):
            guard !url.isEmpty, !url.hasPrefix("-"), !url.contains(where: { $0.isWhitespace }) else {
                throw FurcateError(.invalidArgument, "'\(url.prefix(200))' is not a git repository URL")
            }
            try absolute(path, "git clone path")
            if let rev, rev.isEmpty || rev.hasPrefix("-") || rev.contains(where: { $0.isWhitespace }) {
                throw FurcateError(.invalidArgument, "'\(rev.prefix(80))' is not a git revision")
            }
        case .file(let p, let c, _):
            try absolute(p, "file path")
            guard c.count <= 64 << 20 else { throw FurcateError(.invalidArgument, "file \(p) is larger than 64 MiB") }
        case .env(let e):
            for k in e.keys where k.isEmpty || k.contains("=") || k.contains("\n") || (e[k]?.contains("\n") ?? false) {
                throw FurcateError(
                    .invalidArgument, "environment variable '\(k.prefix(80))' (names without '=', no newlines)")
            }
        case .workdir(let w): try absolute(w, "working directory")
        case .service(let unit):
            if let p = unit.problem { throw FurcateError(.invalidArgument, "systemd service: \(p)") }
        case .group, .user: break
        }
    }
}

/// InstaVM's `build_args` (seed 000), applied in its order: apt, pip, npm packages, the git
/// clone into /app/repo, environment, then the post-build command.
public struct InstaVMBuildArgs: Codable, Hashable, Sendable {
    /// Debian packages, separated by white space.
    public var extraAptPackages: String?
    /// Python packages for pip, separated by white space.
    public var extraPipPackages: String?
    /// npm packages, separated by white space.
    public var extraNpmPackages: String?
    /// A repository cloned into /app/repo.
    public var gitCloneUrl: String?
    /// The branch (or tag) to clone; nil: the repository's default.
    public var gitCloneBranch: String?
    /// The rootfs size in GiB; nil: sized to the image's content.
    public var diskSizeGb: Int?
    /// Variables added to the guest's environment.
    public var envs: [String: String]?
    /// A shell command run last.
    public var postBuildCmd: String?

    /// Nothing to do beyond the image.
    public init() {}

    /// The recipe: `image` as the base, these steps in the order above, the VM's `vcpus` and `memoryMiB`.
    public func recipe(image: String, vcpus: Int?, memoryMiB: Int?) -> BuildRecipe {
        var steps: [BuildStep] = []
        func words(_ s: String?) -> [String] { (s ?? "").split(whereSeparator: { $0.isWhitespace }).map(String.init) }
        if !words(extraAptPackages).isEmpty { steps.append(.apt(words(extraAptPackages))) }
        if !words(extraPipPackages).isEmpty { steps.append(.pip(words(extraPipPackages))) }
        if !words(extraNpmPackages).isEmpty { steps.append(.npm(words(extraNpmPackages))) }
        if let u = gitCloneUrl, !u.isEmpty { steps.append(.git(url: u, path: "/app/repo", rev: gitCloneBranch)) }
        if let e = envs, !e.isEmpty { steps.append(.env(e)) }
        if let c = postBuildCmd, !c.isEmpty { steps.append(.run(command: c)) }
        return BuildRecipe(
            base: .image(image), steps: steps, vcpus: vcpus, memoryMiB: memoryMiB,
            diskBytes: diskSizeGb.map { UInt64($0) << 30 })
    }
}
