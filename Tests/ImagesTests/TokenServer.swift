import Crypto
import Foundation
import FurcateCore
import FurcateTestSupport

#if canImport(Glibc)
    import Glibc
#endif

/// A Docker token service on loopback for `docker-registry`'s `auth: token`: it hands out
/// ES256 JWTs (signed with a throwaway key whose self-signed certificate the registry trusts,
/// sent in the `x5c` header) to clients presenting the right basic credentials.
final class TokenServer: @unchecked Sendable {
    let tmp = TempDir("token")
    let port: Int
    let service = "furcate-test-registry"
    let issuer = "furcate-test-issuer"
    let user: (String, String)
    private let listener: Int32
    private let key: P256.Signing.PrivateKey
    private let certDER: Data
    private let lock = NSLock()
    private var _requests = 0
    var requests: Int { lock.withLock { _requests } }
    var certPath: String { tmp.sub("cert.pem") }
    var realm: String { "http://127.0.0.1:\(port)/token" }

    init(user: (String, String)) throws {
        self.user = user
        try sh([
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", tmp.sub("key.pem"), "-out", tmp.sub("cert.pem"), "-subj", "/CN=furcate-token", "-days", "2",
        ])
        try sh(["openssl", "pkcs8", "-topk8", "-nocrypt", "-in", tmp.sub("key.pem"), "-out", tmp.sub("key8.pem")])
        key = try P256.Signing.PrivateKey(
            pemRepresentation: try String(contentsOfFile: tmp.sub("key8.pem"), encoding: .utf8))
        let pem = try String(contentsOfFile: tmp.sub("cert.pem"), encoding: .utf8)
        let b64 = pem.split(separator: "\n").filter { !$0.hasPrefix("-----") }.joined()
        guard let der = Data(base64Encoded: b64) else {
            throw FurcateError(.io, "openssl wrote a certificate that is not base64")
        }
        certDER = der

        (listener, port) = try loopbackListener()
        let t = Thread { [self] in serve() }
        t.start()
    }

    /// Ends the accept loop (whose thread holds this object until then) and closes the socket.
    func stop() {
        shutdown(listener, Int32(SHUT_RDWR))
        close(listener)
    }

    /// The registry's `auth:` section.
    var registryConfig: String {
        "auth:\n  token:\n    realm: \(realm)\n    service: \(service)\n    issuer: \(issuer)\n    rootcertbundle: \(certPath)\n"
    }

    private func serve() {
        while true {
            let c = accept(listener, nil, nil)
            if c < 0 {
                guard errno == EINTR else { return }
                continue
            }
            handle(c)
            close(c)
        }
    }

    private func handle(_ c: Int32) {
        var buf = [UInt8](repeating: 0, count: 16384)
        let cap = buf.count
        var got = 0
        while got < cap {
            let n = buf.withUnsafeMutableBytes { read(c, $0.baseAddress.map { $0 + got }, cap - got) }
            if n <= 0 { break }
            got += n
            if String(decoding: buf[0..<got], as: UTF8.self).contains("\r\n\r\n") { break }
        }
        lock.withLock { _requests += 1 }
        let head = String(decoding: buf[0..<got], as: UTF8.self)
        let lines = head.components(separatedBy: "\r\n")
        let target = lines.first?.split(separator: " ").dropFirst().first.map(String.init) ?? "/"
        let auth = lines.first { $0.lowercased().hasPrefix("authorization:") }.map {
            String($0.dropFirst(14)).trimmingCharacters(in: .whitespaces)
        }
        let expected = "Basic " + Data("\(user.0):\(user.1)".utf8).base64EncodedString()
        guard auth == expected else {
            respond(c, 401, #"{"errors":[{"code":"UNAUTHORIZED","message":"bad or missing credentials"}]}"#)
            return
        }
        // scope=repository:NAME:pull,push (one or more scope parameters)
        let query = URLComponents(string: "http://x" + target)?.queryItems ?? []
        var access: [[String: Any]] = []
        for s in query where s.name == "scope" {
            let parts = (s.value ?? "").split(separator: ":")
            if parts.count == 3 {
                access.append([
                    "type": String(parts[0]), "name": String(parts[1]),
                    "actions": parts[2].split(separator: ",").map(String.init),
                ])
            }
        }
        do {
            respond(c, 200, "{\"token\":\"\(try jwt(access: access))\",\"expires_in\":300}")
        } catch {
            respond(c, 500, "{}")
        }
    }

    private func jwt(access: [[String: Any]]) throws -> String {
        func b64url(_ d: Data) -> String {
            d.base64EncodedString().replacingOccurrences(of: "+", with: "-").replacingOccurrences(of: "/", with: "_")
                .replacingOccurrences(of: "=", with: "")
        }
        let header: [String: Any] = ["typ": "JWT", "alg": "ES256", "x5c": [certDER.base64EncodedString()]]
        let now = Int(Date().timeIntervalSince1970)
        let claims: [String: Any] = [
            "iss": issuer, "sub": user.0, "aud": service, "exp": now + 300, "nbf": now - 10, "iat": now,
            "jti": UUID().uuidString, "access": access,
        ]
        let signingInput =
            b64url(try JSONSerialization.data(withJSONObject: header)) + "."
            + b64url(try JSONSerialization.data(withJSONObject: claims))
        let sig = try key.signature(for: Data(signingInput.utf8))
        return signingInput + "." + b64url(sig.rawRepresentation)
    }

    private func respond(_ c: Int32, _ status: Int, _ body: String) {
        let text =
            "HTTP/1.1 \(status) \(status == 200 ? "OK" : "Error")\r\nContent-Type: application/json\r\nContent-Length: \(body.utf8.count)\r\nConnection: close\r\n\r\n\(body)"
        _ = text.withCString { write(c, $0, strlen($0)) }
    }
}

/// A TCP socket listening on 127.0.0.1 at a port the kernel picked, and that port.
func loopbackListener() throws -> (fd: Int32, port: Int) {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    var a = sockaddr_in()
    a.sin_family = sa_family_t(AF_INET)
    a.sin_addr.s_addr = inet_addr("127.0.0.1")
    let r = withUnsafePointer(to: &a) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
            bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
        }
    }
    guard r == 0, listen(fd, 16) == 0 else { throw FurcateError.system("bind", errno: errno) }
    var len = socklen_t(MemoryLayout<sockaddr_in>.size)
    _ = withUnsafeMutablePointer(to: &a) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) }
    }
    return (fd, Int(UInt16(bigEndian: a.sin_port)))
}
