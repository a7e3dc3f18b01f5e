import FurcateCore
import FurcateEngine
import Testing

@testable import Ingress

/// The ingress's pure parts: request heads in and out, and the host names of a site.
@Suite struct IngressParsingTests {
    @Test func aRequestHeadIsParsedWithItsHostLowercasedAndPortless() throws {
        let r = try #require(
            parseHead("GET /a?b=1 HTTP/1.1\r\nHost: ABCDEFGHIJ0123456789-8000.LocalHost:8081\r\nX-Thing:  v \r\n"[...]))
        #expect(r.method == "GET" && r.target == "/a?b=1")
        #expect(r.host == "abcdefghij0123456789-8000.localhost")
        #expect(r.header("x-thing") == "v" && !r.isUpgrade)
    }

    @Test func malformedHeadsAreRefused() {
        for bad in [
            "GET / HTTP/2\r\nHost: a\r\n",  // not HTTP/1.x
            "GET /\r\nHost: a\r\n",  // no version
            "GET / HTTP/1.1\r\n",  // no Host
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n",  // two
            "GET / HTTP/1.1\r\nHost: a\r\nbad header\r\n",  // no colon
            "GET / HTTP/1.1\r\nHost: [::1]:80\r\n",  // an IPv6 literal names no VM
        ] {
            #expect(parseHead(bad[...]) == nil, "\(bad)")
        }
    }

    @Test func theHeadSentOnDropsCredentialsAndForgedForwardingHeaders() throws {
        let r = try #require(
            parseHead(
                "GET / HTTP/1.1\r\nHost: x.localhost\r\nX-API-Key: fk_secret\r\nX-Forwarded-For: 1.2.3.4\r\nConnection: keep-alive\r\n"[
                    ...]))
        let out = renderHead(r, drop: ["x-api-key"], close: true, client: "127.0.0.1")
        #expect(!out.contains("fk_secret") && !out.contains("1.2.3.4") && !out.contains("keep-alive"))
        #expect(out.contains("Connection: close\r\n") && out.contains("X-Forwarded-For: 127.0.0.1\r\n"))
        #expect(out.hasSuffix("\r\n\r\n"))
        // An upgrade keeps its Connection header even on a one-request connection.
        let ws = try #require(
            parseHead("GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"[...]))
        #expect(renderHead(ws, drop: [], close: true, client: nil).contains("Connection: Upgrade\r\n"))
    }

    @Test func aSiteNamesVMsPortsAndNothingElse() {
        let site = IngressSite(publicDomain: "Example.Test", port: 8081)
        let vm = "abcdefghij0123456789"
        #expect(site.url(vm: vm, port: 3000) == "http://\(vm)-3000.example.test:8081/")
        #expect(IngressSite(publicDomain: "x.test", port: 80).url(vm: vm, port: 1) == "http://\(vm)-1.x.test/")
        #expect(site.target(of: "\(vm)-3000.example.test")! == (vm, 3000))
        #expect(site.target(of: "\(vm).example.test")! == (vm, nil))
        #expect(site.covers("example.test") && site.covers("a.b.example.test") && !site.covers("anexample.test"))
        for no in [
            "\(vm)-0.example.test", "\(vm)-65536.example.test", "\(vm)-3x.example.test", "short-3000.example.test",
            "a.\(vm)-3000.example.test", "\(vm)-3000.other.test", "example.test", "\(vm)-1-2.example.test",
        ] {
            #expect(site.target(of: no) == nil, "\(no)")
        }
    }

    @Test func domainsAreCheckedAndLowercased() throws {
        #expect(try Engine.checkDomain("App.Example.COM") == "app.example.com")
        for bad in [
            "localhost", "a..b", "-a.b", "a-.b", "a b.c", "ä.de", "0.0", "app.123",
            String(repeating: "a", count: 64) + ".b",
        ] {
            #expect(throws: FurcateError.self, "\(bad)") { try Engine.checkDomain(bad) }
        }
    }
}
