import Foundation
import FurcateCore
import FurcateTestSupport

#if canImport(Glibc)
    import Glibc
#endif

/// Debian's `docker-registry` (distribution 2.x) on a loopback port: anonymous, or htpasswd
/// (basic auth) with one user.
final class TestRegistry: @unchecked Sendable {
    static let binary = "/usr/bin/docker-registry"
    static var unavailable: String? {
        for b in [binary, "/usr/bin/skopeo", "/usr/bin/htpasswd"] where !FileManager.default.isExecutableFile(atPath: b)
        {
            return "\(b) is not installed (scripts/packages.sh installs docker-registry, skopeo, apache2-utils)"
        }
        return nil
    }

    let tmp = TempDir("registry")
    let port: Int
    let user: (String, String)?
    private let process = Process()
    var host: String { "127.0.0.1:\(port)" }

    /// The token service when the registry uses token auth.
    let tokens: TokenServer?

    init(user: (String, String)? = nil, tokenAuth: Bool = false) throws {
        self.user = user
        port = try Self.freePort()
        var auth = ""
        tokens = tokenAuth ? try TokenServer(user: user ?? ("furcate", "token-pass")) : nil
        if let tokens { auth = tokens.registryConfig }
        if let (u, p) = user, !tokenAuth {
            let line = try sh(["htpasswd", "-Bbn", u, p]).trimmingCharacters(in: .whitespacesAndNewlines)
            try writeFile(tmp.sub("htpasswd"), line + "\n")
            auth = "auth:\n  htpasswd:\n    realm: furcate-test\n    path: \(tmp.sub("htpasswd"))\n"
        }
        try writeFile(
            tmp.sub("config.yml"),
            """
            version: 0.1
            log:
              level: error
            storage:
              filesystem:
                rootdirectory: \(tmp.sub("data"))
            http:
              addr: 127.0.0.1:\(port)
            \(auth)
            """)
        process.executableURL = URL(fileURLWithPath: Self.binary)
        process.arguments = ["serve", tmp.sub("config.yml")]
        process.standardOutput = FileHandle(forWritingAtPath: "/dev/null")
        let log =
            FileManager.default.createFile(atPath: tmp.sub("log"), contents: nil)
            ? FileHandle(forWritingAtPath: tmp.sub("log")) : nil
        process.standardError = log
        try process.runWithSignalsUnblocked()
        // Ready when it accepts connections.
        for _ in 0..<200 {
            if Self.canConnect(port) { return }
            usleep(25_000)
        }
        process.terminate()
        throw FurcateError(
            .timedOut,
            "docker-registry did not listen on \(port): \((try? String(contentsOfFile: tmp.sub("log"), encoding: .utf8)) ?? "")"
        )
    }

    deinit {
        tokens?.stop()
        process.terminate()
        process.waitUntilExit()
    }

    /// Pushes an OCI layout's tagged image as `name:tag`.
    func push(layout: String, tag: String, as name: String) throws {
        var args = ["skopeo", "--insecure-policy", "copy", "-q", "--dest-tls-verify=false"]
        if let (u, p) = user { args += ["--dest-creds", "\(u):\(p)"] }
        try sh(args + ["oci:\(layout):\(tag)", "docker://\(host)/\(name)"])
    }

    static func canConnect(_ port: Int) -> Bool {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var a = sockaddr_in()
        a.sin_family = sa_family_t(AF_INET)
        a.sin_port = in_port_t(UInt16(port).bigEndian)
        a.sin_addr.s_addr = inet_addr("127.0.0.1")
        return withUnsafePointer(to: &a) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
            }
        } == 0
    }

    /// A port the kernel just handed out (bound to 0, then released).
    static func freePort() throws -> Int {
        let (fd, port) = try loopbackListener()
        close(fd)
        return port
    }
}
