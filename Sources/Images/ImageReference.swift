import FurcateCore

/// Where an image comes from, parsed from the strings users type:
///
/// - `python:3.12-slim`, `docker.io/library/python:3.12`, `localhost:5000/team/app@sha256:…`,
///   optionally prefixed `docker://` — a registry (Docker Hub when no host is named);
/// - `rootfs:FILE` — a root filesystem tarball, plain or compressed (mmdebstrap's output,
///   `docker export`), taken as a one-layer image with no configuration;
/// - `oci:DIR[:TAG]` — a local OCI image layout directory (as skopeo writes it);
/// - `docker-archive:FILE` — a tarball from `docker save`.
public enum ImageReference: Hashable, Sendable, CustomStringConvertible {
    case registry(RegistryReference)
    case ociLayout(path: String, tag: String?)
    case dockerArchive(path: String)
    case rootfsTar(path: String)

    /// Parses a reference in one of the forms above.
    /// - Throws: `.invalidArgument` for one that fits none of them.
    public init(parsing s: String) throws {
        if s.hasPrefix("oci:") {
            let rest = String(s.dropFirst(4))
            guard !rest.isEmpty else { throw FurcateError(.invalidArgument, "'oci:' needs a directory: oci:DIR[:TAG]") }
            // The tag follows the last ':' after the last '/' (skopeo's rule).
            let lastSlash = rest.lastIndex(of: "/") ?? rest.startIndex
            if let colon = rest[lastSlash...].lastIndex(of: ":") {
                let tag = String(rest[rest.index(after: colon)...])
                self = .ociLayout(path: String(rest[..<colon]), tag: tag.isEmpty ? nil : tag)
            } else {
                self = .ociLayout(path: rest, tag: nil)
            }
        } else if s.hasPrefix("rootfs:") {
            let path = String(s.dropFirst("rootfs:".count))
            guard !path.isEmpty else { throw FurcateError(.invalidArgument, "'rootfs:' needs a tarball: rootfs:FILE") }
            self = .rootfsTar(path: path)
        } else if s.hasPrefix("docker-archive:") {
            let path = String(s.dropFirst("docker-archive:".count))
            guard !path.isEmpty else {
                throw FurcateError(.invalidArgument, "'docker-archive:' needs a file: docker-archive:FILE")
            }
            self = .dockerArchive(path: path)
        } else {
            self = .registry(try RegistryReference(parsing: s.hasPrefix("docker://") ? String(s.dropFirst(9)) : s))
        }
    }

    /// The reference as it is typed (`oci:DIR:TAG`, a registry reference normalised).
    public var description: String {
        switch self {
        case .registry(let r): return r.description
        case .ociLayout(let p, let t): return "oci:" + p + (t.map { ":" + $0 } ?? "")
        case .dockerArchive(let p): return "docker-archive:" + p
        case .rootfsTar(let p): return "rootfs:" + p
        }
    }
}

/// A registry image reference, normalised as Docker does (`python` is
/// `docker.io/library/python:latest`).
public struct RegistryReference: Hashable, Sendable, CustomStringConvertible {
    /// The registry as named (`docker.io`, `localhost:5000`).
    public let domain: String
    /// The repository path (`library/python`).
    public let repository: String
    /// The tag, if one was given.
    public let tag: String?
    /// The manifest digest, if one was given (`@sha256:…`).
    public let digest: Digest?

    /// Parses `[HOST[:PORT]/]PATH[:TAG][@DIGEST]`, normalised as Docker does.
    /// - Throws: `.invalidArgument` naming what is wrong.
    public init(parsing input: String) throws {
        var s = Substring(input)
        guard !s.isEmpty, s.utf8.count <= 512 else {
            throw FurcateError(.invalidArgument, "image reference '\(input.prefix(80))' is empty or too long")
        }
        var digest: Digest?
        if let at = s.firstIndex(of: "@") {
            digest = try Digest(parsing: String(s[s.index(after: at)...]))
            s = s[..<at]
        }
        var tag: String?
        let lastSlash = s.lastIndex(of: "/") ?? s.startIndex
        if let colon = s[lastSlash...].lastIndex(of: ":") {
            tag = String(s[s.index(after: colon)...])
            s = s[..<colon]
        }
        var parts = s.split(separator: "/", omittingEmptySubsequences: false).map(String.init)
        var domain = "docker.io"
        if parts.count > 1, parts[0].contains(".") || parts[0].contains(":") || parts[0] == "localhost" {
            domain = parts.removeFirst()
        }
        if domain == "index.docker.io" { domain = "docker.io" }
        if domain == "docker.io" && parts.count == 1 { parts.insert("library", at: 0) }
        let repo = parts.joined(separator: "/")
        func bad(_ why: String) -> FurcateError {
            FurcateError(.invalidArgument, "image reference '\(input.prefix(200))' is invalid: \(why)")
        }
        guard !domain.isEmpty, domain.utf8.allSatisfy({ Self.isHostByte($0) }) else {
            throw bad("registry host '\(domain)'")
        }
        for p in parts {
            guard !p.isEmpty,
                p.utf8.allSatisfy({
                    (97...122).contains($0) || (48...57).contains($0) || $0 == 46 || $0 == 95 || $0 == 45
                }),
                let f = p.utf8.first, let l = p.utf8.last, Self.isAlnum(f), Self.isAlnum(l)
            else {
                throw bad(
                    "repository component '\(p)' (lowercase letters, digits and . _ - only, starting and ending alphanumeric)"
                )
            }
        }
        if let t = tag {
            guard (1...128).contains(t.utf8.count), t.utf8.first.map({ Self.isAlnum($0) || $0 == 95 }) == true,
                t.utf8.allSatisfy({ Self.isAlnum($0) || $0 == 95 || $0 == 46 || $0 == 45 })
            else { throw bad("tag '\(t)' (letters, digits, _ . - ; at most 128)") }
        }
        self.domain = domain
        self.repository = repo
        self.tag = tag ?? (digest == nil ? "latest" : nil)
        self.digest = digest
    }

    static func isAlnum(_ b: UInt8) -> Bool { (97...122).contains(b) || (65...90).contains(b) || (48...57).contains(b) }
    static func isHostByte(_ b: UInt8) -> Bool { isAlnum(b) || b == 46 || b == 45 || b == 58 || b == 91 || b == 93 }

    /// The host the registry API answers on (Docker Hub's API is not at docker.io).
    public var apiHost: String { domain == "docker.io" ? "registry-1.docker.io" : domain }

    /// Plain HTTP for loopback registries (as Docker allows), HTTPS otherwise.
    public var isLoopback: Bool {
        let host =
            domain.hasPrefix("[")
            ? String(domain.prefix { $0 != "]" }.dropFirst()) : String(domain.prefix { $0 != ":" })
        return host == "localhost" || host.hasPrefix("127.") || host == "::1"
    }

    /// What a manifest request names: the digest when pinned, else the tag.
    public var manifestReference: String { digest?.description ?? tag ?? "latest" }

    /// `DOMAIN/REPOSITORY[:TAG][@DIGEST]`.
    public var description: String {
        domain + "/" + repository + (tag.map { ":" + $0 } ?? "") + (digest.map { "@" + $0.description } ?? "")
    }
}
