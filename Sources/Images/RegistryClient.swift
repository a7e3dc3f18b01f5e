import AsyncHTTPClient
import Foundation
import FurcateCore
import Logging
import NIOCore
import NIOHTTP1
import Synchronization

/// Credentials for a private registry (Freestyle's `DockerCredentials`: username and password,
/// or a token as the password).
public struct RegistryCredentials: Sendable, Hashable {
    /// The user name.
    public var username: String
    /// The password, or a token.
    public var password: String
    /// Credentials of `username` and `password`.
    public init(username: String, password: String) {
        self.username = username
        self.password = password
    }

    var basicHeader: String { "Basic " + Data("\(username):\(password)".utf8).base64EncodedString() }
}

/// A client of the OCI distribution API (pull side): manifests and blobs, with anonymous, basic
/// and bearer-token auth driven by the registry's `WWW-Authenticate` challenge. Loopback
/// registries are spoken to over plain HTTP, as Docker does; others over HTTPS.
final class RegistryClient: Sendable {
    let ref: RegistryReference
    let credentials: RegistryCredentials?
    let insecure: Bool
    private let logger: Logger
    /// The Authorization header that last worked (a bearer token or basic credentials).
    private let authorization = Mutex<String?>(nil)

    /// One HTTP client for the process: redirects are followed by hand (Authorization must not
    /// follow a blob to a CDN), a stalled connection fails after a minute.
    static let http = HTTPClient(
        eventLoopGroupProvider: .singleton,
        configuration: HTTPClient.Configuration(
            redirectConfiguration: .disallow, timeout: .init(connect: .seconds(5), read: .seconds(60))))

    init(ref: RegistryReference, credentials: RegistryCredentials?, insecure: Bool, logger: Logger) {
        self.ref = ref
        self.credentials = credentials
        self.insecure = insecure || ref.isLoopback
        self.logger = logger
    }

    var baseURL: String { (insecure ? "http://" : "https://") + ref.apiHost + "/v2/" + ref.repository }

    /// Fetches a manifest (or index) by tag or digest: its bytes, digest and media type.
    /// - Throws: `.notFound` for an unknown image, `.damaged` when a pinned digest does not match.
    func manifest(_ reference: String) async throws -> (bytes: [UInt8], digest: Digest, mediaType: String?) {
        let resp = try await send(
            baseURL + "/manifests/" + reference, accept: MediaType.manifestAccept, timeout: .seconds(60))
        let body = try await collect(resp, limit: 4 << 20, what: "the manifest of \(ref)")
        let digest = Digest(of: body)
        if let pinned = try? Digest(parsing: reference), pinned != digest {
            throw FurcateError(
                .damaged, "registry \(ref.domain) sent a manifest with digest \(digest) for \(pinned) (digest mismatch)"
            )
        }
        return (body, digest, OCIDecode.mediaType(of: body, header: resp.headers.first(name: "Content-Type")))
    }

    /// Attempts at one blob when its download breaks off (the connection drops, or the
    /// registry sends nothing for a minute); each later one resumes where the last ended.
    static let downloadAttempts = 3

    /// Downloads a blob into the cache, resuming a partial download with a range request. A
    /// download that breaks off is resumed, up to `downloadAttempts` in all; a resumed download
    /// that fails its digest check (a damaged partial file) starts over once.
    /// - Throws: `.unavailable` naming the blob and the registry once every attempt broke off.
    func blob(_ d: Descriptor, into cache: BlobCache, what: String, progress: @Sendable (UInt64) -> Void) async throws {
        var attempt = 1
        while true {
            do {
                do {
                    try await download(d, into: cache, what: what, resume: true, progress: progress)
                } catch let e as FurcateError where e.code == .damaged && e.message.contains("resumed") {
                    logger.warning(
                        "a resumed download failed its check; starting over", metadata: ["blob": "\(d.digest)"])
                    try await download(d, into: cache, what: what, resume: false, progress: progress)
                }
                return
            } catch {
                // A broken transfer (any error of the HTTP stack — a client timeout, a body the
                // connection cut short — or the registry unreachable or answering 5xx) is worth
                // resuming; what the registry or the disk said no to, or a cancelled pull, is not.
                let broken =
                    (error as? FurcateError).map { $0.code == .unavailable } ?? !(error is CancellationError)
                guard broken, attempt < Self.downloadAttempts else {
                    if error is FurcateError { throw error }
                    throw FurcateError(
                        .unavailable,
                        "downloading \(what) (\(d.digest)) from registry \(ref.domain) broke off after \(attempt) "
                            + "attempt(s): \(error)", underlying: UnderlyingMessage(error))
                }
                logger.warning(
                    "a download broke off; resuming it",
                    metadata: ["blob": "\(d.digest)", "attempt": "\(attempt)", "error": "\(error)"])
                try await Task.sleep(for: .seconds(attempt))
                attempt += 1
            }
        }
    }

    private func download(
        _ d: Descriptor, into cache: BlobCache, what: String, resume: Bool, progress: @Sendable (UInt64) -> Void
    ) async throws {
        if cache.contains(d.digest) { return }
        let w = try PartialBlob(cache: cache, digest: d.digest, resume: resume)
        let resumedFrom = w.offset
        var range: String?
        if w.offset > 0 && Int64(w.offset) < d.size {
            range = "bytes=\(w.offset)-"
        } else if w.offset > 0 {
            try w.restart()
        }
        let resp = try await send(
            baseURL + "/blobs/" + d.digest.description, accept: nil, range: range, timeout: .hours(6))
        if resp.status == .ok && w.offset > 0 { try w.restart() }  // the range was ignored
        progress(w.offset)
        for try await chunk in resp.body {
            try chunk.withUnsafeReadableBytes { try w.append($0) }
            progress(w.offset)
        }
        let resumed = resp.status.code == 206 && resumedFrom > 0
        try w.commit(size: d.size, what: resumed ? what + " (resumed at byte \(resumedFrom))" : what)
    }

    /// Sends a GET, answering one auth challenge and following up to five redirects (dropping
    /// Authorization when the host changes). Non-2xx answers become FurcateErrors.
    private func send(_ url: String, accept: String?, range: String? = nil, timeout: TimeAmount) async throws
        -> HTTPClientResponse
    {
        var url = url
        var triedAuth = false
        var redirects = 0
        let origin = hostOf(url)
        while true {
            var req = HTTPClientRequest(url: url)
            if let accept { req.headers.add(name: "Accept", value: accept) }
            if let range { req.headers.add(name: "Range", value: range) }
            req.headers.add(name: "User-Agent", value: "furcate")
            if hostOf(url) == origin, let a = authorization.withLock({ $0 }) {
                req.headers.add(name: "Authorization", value: a)
            }
            let resp: HTTPClientResponse
            do {
                resp = try await Self.http.execute(req, timeout: timeout)
            } catch {
                throw FurcateError(
                    .unavailable, "cannot reach registry \(ref.domain) at \(url.prefix(200)): \(error)",
                    underlying: error)
            }
            switch resp.status.code {
            case 200, 206:
                return resp
            case 301, 302, 303, 307, 308:
                _ = try? await resp.body.collect(upTo: 1 << 16)
                guard redirects < 5, let loc = resp.headers.first(name: "Location") else {
                    throw FurcateError(
                        .unavailable,
                        "registry \(ref.domain) redirected too often (or without a Location) for \(url.prefix(200))")
                }
                redirects += 1
                url = URL(string: loc, relativeTo: URL(string: url))?.absoluteString ?? loc
            case 401 where !triedAuth:
                let challenge = resp.headers.first(name: "WWW-Authenticate")
                _ = try? await resp.body.collect(upTo: 1 << 16)
                triedAuth = true
                try await authenticate(challenge)
            case 401, 403:
                let body = (try? await resp.body.collect(upTo: 1 << 16)).map { String(buffer: $0) } ?? ""
                throw FurcateError(
                    .unauthenticated,
                    credentials == nil
                        ? "registry \(ref.domain) wants credentials to pull \(ref.repository) (HTTP \(resp.status.code)) \(summary(body))"
                        : "registry \(ref.domain) refused the credentials given for \(ref.repository) (HTTP \(resp.status.code)) \(summary(body))"
                )
            case 404:
                let body = (try? await resp.body.collect(upTo: 1 << 16)).map { String(buffer: $0) } ?? ""
                throw FurcateError(
                    .notFound,
                    "image \(ref) not found: registry \(ref.domain) answered 404 for \(url.split(separator: "/v2/").last ?? "") \(summary(body))"
                )
            case 416:
                throw FurcateError(
                    .unavailable, "registry \(ref.domain) refused the range request for \(url.prefix(200))")
            default:
                let body = (try? await resp.body.collect(upTo: 1 << 16)).map { String(buffer: $0) } ?? ""
                throw FurcateError(
                    .unavailable,
                    "registry \(ref.domain) answered HTTP \(resp.status.code) for \(url.prefix(200)) \(summary(body))")
            }
        }
    }

    /// Answers a `WWW-Authenticate` challenge: basic with the credentials, or a bearer token
    /// from the named realm (with the credentials as basic auth when given).
    private func authenticate(_ challenge: String?) async throws {
        guard let challenge else {
            throw FurcateError(
                .unauthenticated, "registry \(ref.domain) answered 401 without a WWW-Authenticate challenge")
        }
        let (scheme, params) = Self.parseChallenge(challenge)
        switch scheme {
        case "basic":
            guard let credentials else {
                throw FurcateError(
                    .unauthenticated,
                    "registry \(ref.domain) wants credentials (basic auth) to pull \(ref.repository); none were given")
            }
            authorization.withLock { $0 = credentials.basicHeader }
        case "bearer":
            guard let realm = params["realm"], var comps = URLComponents(string: realm) else {
                throw FurcateError(
                    .unauthenticated,
                    "registry \(ref.domain) sent a bearer challenge without a realm: \(challenge.prefix(200))")
            }
            var items = comps.queryItems ?? []
            if let service = params["service"] { items.append(URLQueryItem(name: "service", value: service)) }
            items.append(URLQueryItem(name: "scope", value: params["scope"] ?? "repository:\(ref.repository):pull"))
            comps.queryItems = items
            guard let url = comps.url?.absoluteString else {
                throw FurcateError(
                    .unauthenticated, "registry \(ref.domain) named an unusable token realm '\(realm.prefix(200))'")
            }
            var req = HTTPClientRequest(url: url)
            if let credentials { req.headers.add(name: "Authorization", value: credentials.basicHeader) }
            let resp: HTTPClientResponse
            do {
                resp = try await Self.http.execute(req, timeout: .seconds(60))
            } catch {
                throw FurcateError(
                    .unavailable, "cannot reach the token service of \(ref.domain) at \(url.prefix(200)): \(error)",
                    underlying: error)
            }
            let body = try await collect(resp, limit: 1 << 20, what: "the token answer", allowError: true)
            guard resp.status.code == 200 else {
                throw FurcateError(
                    .unauthenticated,
                    "the token service of \(ref.domain) refused \(credentials == nil ? "an anonymous" : "the credentials' ") pull of \(ref.repository) (HTTP \(resp.status.code)) \(summary(String(decoding: body, as: UTF8.self)))"
                )
            }
            struct Token: Decodable { var token: String?; var access_token: String? }
            guard let t = try? JSONDecoder().decode(Token.self, from: Data(body)),
                let token = t.token ?? t.access_token, !token.isEmpty
            else {
                throw FurcateError(.unauthenticated, "the token service of \(ref.domain) answered without a token")
            }
            authorization.withLock { $0 = "Bearer " + token }
        default:
            throw FurcateError(
                .unauthenticated,
                "registry \(ref.domain) asks for '\(scheme)' auth, which Furcate does not speak (basic or bearer)")
        }
    }

    /// `Bearer realm="…",service="…",scope="…"` → ("bearer", params).
    static func parseChallenge(_ s: String) -> (String, [String: String]) {
        let trimmed = s.trimmingCharacters(in: .whitespaces)
        let scheme = String(trimmed.prefix { $0 != " " }).lowercased()
        var params: [String: String] = [:]
        var rest = Substring(trimmed.dropFirst(scheme.count))
        while !rest.isEmpty {
            rest = rest.drop { $0 == " " || $0 == "," }
            guard let eq = rest.firstIndex(of: "=") else { break }
            let key = rest[..<eq].trimmingCharacters(in: .whitespaces).lowercased()
            rest = rest[rest.index(after: eq)...]
            var value = ""
            if rest.first == "\"" {
                rest = rest.dropFirst()
                while let c = rest.first, c != "\"" {
                    if c == "\\", rest.count > 1 { rest = rest.dropFirst() }
                    if let next = rest.first { value.append(next) }
                    rest = rest.dropFirst()
                }
                rest = rest.dropFirst()
            } else {
                value = String(rest.prefix { $0 != "," })
                rest = rest.dropFirst(value.count)
            }
            params[key] = value
        }
        return (scheme, params)
    }

    private func collect(_ resp: HTTPClientResponse, limit: Int, what: String, allowError: Bool = false) async throws
        -> [UInt8]
    {
        do {
            let buf = try await resp.body.collect(upTo: limit)
            return Array(buf.readableBytesView)
        } catch let e as NIOTooManyBytesError {
            throw FurcateError(
                .invalidArgument, "\(what) from \(ref.domain) is larger than \(limit) bytes", underlying: e)
        } catch {
            throw FurcateError(.unavailable, "reading \(what) from \(ref.domain) failed: \(error)", underlying: error)
        }
    }

    private func summary(_ body: String) -> String {
        let b = body.trimmingCharacters(in: .whitespacesAndNewlines)
        return b.isEmpty ? "" : "— " + String(b.prefix(300))
    }

    private func hostOf(_ url: String) -> String? { URL(string: url)?.host }
}
