import APIServer
import Foundation
import FurcateCore
import FurcateEngine
import FurcateTestSupport
import GuestAgentProtocol
import Hummingbird
import HummingbirdTesting
import Ingress
import Logging
import Testing
import VMNetwork
import VMService

#if canImport(Glibc)
    import Glibc
#endif

/// Guest side of the ingress test: busybox httpd with a marker page and a CGI that streams,
/// and a WebSocket echo (handshake with sha1sum and base64, short frames unmasked with od).
let ingressGuestSetup = #"""
    mkdir -p /tmp/www/cgi-bin
    echo "$1" > /tmp/www/index.html
    cat > /tmp/www/cgi-bin/stream <<'EOF'
    #!/bin/sh
    printf 'Content-Type: text/plain\r\n\r\n'
    for i in 1 2 3; do echo "chunk$i"; sleep 1; done
    EOF
    cat > /tmp/ws-echo <<'EOF'
    #!/bin/sh
    key=""
    while IFS= read -r line; do
      line=$(printf '%s' "$line" | tr -d '\r')
      [ -z "$line" ] && break
      case "$line" in [Ss]ec-[Ww]eb[Ss]ocket-[Kk]ey:*) key=$(echo "${line#*:}" | tr -d ' ') ;; esac
    done
    hex=$(printf '%s' "${key}258EAFA5-E914-47DA-95CA-C5AB0DC85B11" | sha1sum | cut -d' ' -f1)
    accept=$(printf "$(echo "$hex" | sed 's/../\\x&/g')" | base64)
    printf 'HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n' "$accept"
    while :; do
      set -- $(dd bs=1 count=2 2>/dev/null | od -An -tu1)
      [ $# -eq 2 ] || exit 0
      op=$(($1 & 15)) len=$(($2 & 127))
      [ $len -lt 126 ] || exit 0
      set -- $(dd bs=1 count=4 2>/dev/null | od -An -tu1)
      m0=$1 m1=$2 m2=$3 m3=$4
      out="" i=0
      for c in $(dd bs=1 count=$len 2>/dev/null | od -An -tu1); do
        case $((i % 4)) in 0) k=$m0 ;; 1) k=$m1 ;; 2) k=$m2 ;; *) k=$m3 ;; esac
        out="$out\\$(printf '%03o' $((c ^ k)))"
        i=$((i + 1))
      done
      if [ $op -eq 8 ]; then printf '\210\000'; exit 0; fi
      printf "\\$(printf '%03o' $((128 | op)))\\$(printf '%03o' $len)$out"
    done
    EOF
    chmod +x /tmp/www/cgi-bin/stream /tmp/ws-echo
    setsid httpd -f -p 8000 -h /tmp/www </dev/null >/dev/null 2>&1 &
    setsid nc -ll -p 9000 -e /tmp/ws-echo </dev/null >/dev/null 2>&1 &
    i=0
    until netstat -ltn | grep -q ':8000 ' && netstat -ltn | grep -q ':9000 '; do
      i=$((i + 1)); [ $i -lt 100 ] || exit 1; sleep 0.1
    done
    """#

/// A connection to the ingress as a browser makes it: to 127.0.0.1, with the VM's host name.
struct IngressClient {
    let port: Int

    /// Sends `request` (a whole head) and reads until `until` is in what came back (or EOF):
    /// the bytes and when each of `marks` first appeared, seconds after the request was sent.
    func exchange(_ request: String, until: String? = nil, marks: [String] = [], then: [UInt8] = [])
        throws -> (text: String, at: [String: Double])
    {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = in_port_t(UInt16(port).bigEndian)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        var tv = timeval(tv_sec: 90, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        let ok = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
            }
        }
        guard ok == 0 else { throw FurcateError(.io, "cannot connect to the ingress on \(port)") }
        let t0 = ContinuousClock.now
        let bytes = Array(request.utf8) + then
        _ = bytes.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, 0) }
        var got: [UInt8] = []
        var at: [String: Double] = [:]
        var buf = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = recv(fd, &buf, buf.count, 0)
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            got += buf[0..<n]
            let text = String(decoding: got, as: UTF8.self)
            for m in marks where at[m] == nil && text.contains(m) {
                let d = ContinuousClock.now - t0
                at[m] = Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18
            }
            if let until, text.contains(until) { break }
        }
        return (String(decoding: got, as: UTF8.self), at)
    }

    /// A GET of `path` on `host`: the status code and the body.
    func get(_ host: String, _ path: String = "/", headers: [String] = []) throws -> (status: Int, body: String) {
        let head =
            "GET \(path) HTTP/1.1\r\nHost: \(host)\r\n" + headers.map { $0 + "\r\n" }.joined()
            + "Connection: close\r\n\r\n"
        let text = try exchange(head).text
        let status = Int(text.split(separator: " ").dropFirst().first ?? "") ?? 0
        let body = text.components(separatedBy: "\r\n\r\n").dropFirst().joined(separator: "\r\n\r\n")
        return (status, body)
    }
}

/// A masked WebSocket text frame (as a client must send it).
func webSocketFrame(_ text: String) -> [UInt8] {
    let payload = Array(text.utf8)
    let mask: [UInt8] = [0x37, 0xfa, 0x21, 0x3d]
    return [0x81, 0x80 | UInt8(payload.count)] + mask + payload.enumerated().map { $0.element ^ mask[$0.offset % 4] }
}

@Suite(.enabled(if: apiVMAvailable && networkAvailable), .serialized) struct IngressTests {
    /// The ingress forwards by host name to a VM's exposed port: a page, a streamed response
    /// (its first chunk long before its last), a WebSocket echo; a fork answers on its own
    /// URLs from its own guest; unknown hosts, unexposed ports and stopped VMs get clear
    /// errors, a private port needs its owner's key (which the guest never sees). The time
    /// limit counts the wait for the other network tests (one at a time: NetworkFixture).
    @Test(.timeLimit(.minutes(10))) func aVMsPortsThroughTheIngressAndAForksOwn() async throws {
        try await NetworkFixture.with { f in
            try await withAPIHarness(networks: f.host) { h in
                try await h.makeSnapshot()
                let site = IngressSite(publicDomain: "localhost", port: 0)
                var engine = h.engine
                engine.ingress = site
                let ingress = IngressServer(
                    options: IngressOptions(host: "127.0.0.1", port: 0),
                    router: EngineIngressRouter(engine: engine, site: site), logger: Logger(label: "test.ingress"))
                let serving = Task { try await ingress.run() }
                defer {
                    ingress.stop()
                    serving.cancel()
                }
                let c = IngressClient(port: try await ingress.port())
                let vm = try await engine.createVM(
                    NewVM(account: "a", snapshot: h.snapshot, policy: VMPolicy(persistence: .persistent)))
                let setup = try await engine.guest(vm, wake: .requireRunning).exec(
                    ExecRequest(
                        argv: ["/bin/sh", "-c", ingressGuestSetup, "setup", "parent-marker"], timeoutMs: 30_000))
                #expect(setup.exitCode == 0, "\(String(decoding: setup.stderr, as: UTF8.self))")
                try engine.expose(vm, port: 8000, isPublic: true, account: "a")
                try engine.expose(vm, port: 9000, isPublic: true, account: "a")

                // The page, by {vm}-{port} and by {vm} (its first exposed port).
                let page = try c.get(site.host(vm: vm.id, port: 8000))
                #expect(page.status == 200 && page.body == "parent-marker\n", "\(page)")
                #expect(try c.get("\(vm.id).localhost:8081").body == "parent-marker\n")

                // A streamed response arrives as it is made.
                let stream = try c.exchange(
                    "GET /cgi-bin/stream HTTP/1.1\r\nHost: \(site.host(vm: vm.id, port: 8000))\r\nConnection: close\r\n\r\n",
                    marks: ["chunk1", "chunk3"])
                let first = try #require(stream.at["chunk1"]), last = try #require(stream.at["chunk3"])
                #expect(last - first > 1.5, "chunk1 at \(first) s, chunk3 at \(last) s: \(stream.text)")

                // A WebSocket: the upgrade, then a frame there and back.
                let hello = "hello through the ingress"
                let ws = try c.exchange(
                    "GET /chat HTTP/1.1\r\nHost: \(site.host(vm: vm.id, port: 9000))\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
                    until: hello, then: webSocketFrame(hello))
                #expect(ws.text.hasPrefix("HTTP/1.1 101"), "\(ws.text)")
                #expect(ws.text.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "\(ws.text)")
                #expect(ws.text.hasSuffix(hello), "\(ws.text)")

                // A fork: its own URL, its own guest; the parent's stays the parent's.
                let fork = try #require(try await engine.fork(vm, account: "a", count: 1).forks.first)
                let edit = try await engine.guest(fork, wake: .requireRunning).exec(
                    ExecRequest(argv: ["/bin/sh", "-c", "echo fork-marker > /tmp/www/index.html"], timeoutMs: 10_000))
                #expect(edit.exitCode == 0)
                #expect(try c.get(site.host(vm: fork.id, port: 8000)).body == "fork-marker\n")
                #expect(try c.get(site.host(vm: vm.id, port: 8000)).body == "parent-marker\n")

                // A domain of the owner's own reaches the VM that has it (not its forks), and
                // belongs to that VM only.
                try engine.expose(vm, port: 8000, isPublic: true, account: "a", domain: "App.Example.test")
                #expect(try c.get("app.example.test").body == "parent-marker\n")
                #expect(engine.exposures(of: fork.id).allSatisfy { $0.domain == nil })
                #expect(throws: FurcateError.self) {
                    try engine.expose(fork, port: 8000, isPublic: true, account: "a", domain: "app.example.test")
                }
                #expect(engine.hostNames(of: vm.id).first == "app.example.test")
                // A name under the public domain would take another VM's traffic: refused.
                #expect(throws: FurcateError.self) {
                    try engine.expose(
                        vm, port: 8000, isPublic: true, account: "a", domain: site.host(vm: fork.id, port: 8000))
                }

                // Clear refusals.
                #expect(try c.get("nothing.example.org").status == 404)
                #expect(try c.get("aaaaaaaaaaaaaaaaaaaa-8000.localhost").status == 404)
                let unexposed = try c.get(site.host(vm: vm.id, port: 8001))
                #expect(unexposed.status == 404 && unexposed.body.contains("PORT_NOT_EXPOSED"), "\(unexposed)")
                _ = try await engine.vms.stop(fork.id)
                let stopped = try c.get(site.host(vm: fork.id, port: 8000))
                #expect(stopped.status == 502 && stopped.body.contains("stopped"), "\(stopped)")

                // Private: only with a key of the VM's owner, and the guest never sees it.
                let e = try #require(engine.exposures(of: vm.id).first { $0.port == 8000 })
                _ = try engine.updateExposure(e, isPublic: false, revoke: false)
                let host = site.host(vm: vm.id, port: 8000)
                #expect(try c.get(host).status == 401)
                #expect(try c.get(host, headers: ["X-API-Key: \(h.keyB)"]).status == 401)
                #expect(try c.get(host, headers: ["X-API-Key: \(h.keyA)"]).body == "parent-marker\n")
                #expect(
                    try await eventually(within: .seconds(10)) { ingress.openConnections(vm.id) == 0 ? true : nil }
                        == true)

                // InstaVM's egress body with a domain allow-list, as the SDK's set_vm_egress sends
                // it: kept normalized and answered back; a malformed name is a 422 naming it.
                let api = engine
                let app = APIServer.buildApplication(api, host: "127.0.0.1", port: 0)
                try await app.test(.live) { client in
                    let path = "/instavm/v1/egress/vm/\(vm.id)"
                    let set = try await call(
                        client, .post, path, h.keyA,
                        #"{"allow_http":false,"allow_https":false,"allowed_domains":["*.Allowed.test","allowed.test"]}"#
                    )
                    #expect(set.status == .ok, "\(String(buffer: set.body))")
                    let got = try await call(client, .get, path, h.keyA)
                    #expect(
                        json(got)["allowed_domains"] as? [String] == ["allowed.test"], "\(String(buffer: got.body))")
                    #expect(json(got)["allow_https"] as? Bool == false)
                    #expect(
                        try await api.vms.info(vm.id).egress
                            == EgressPolicy(allowPublic: false, allowedDomains: ["allowed.test"]))
                    let bad = try await call(client, .post, path, h.keyA, #"{"allowed_domains":["no spaces.test"]}"#)
                    #expect(
                        bad.status == .unprocessableContent && String(buffer: bad.body).contains("allowed_domains"),
                        "\(bad.status) \(String(buffer: bad.body))")
                    #expect(try await call(client, .get, path, h.keyB).status == .notFound)
                }
            }
        }
    }
}
