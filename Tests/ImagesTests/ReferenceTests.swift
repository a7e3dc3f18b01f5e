import FurcateCore
import Images
import Testing

@Suite struct ImageReferenceTests {
    @Test func dockerHubNamesAreNormalised() throws {
        let r = try RegistryReference(parsing: "python:3.12-slim")
        #expect(r.domain == "docker.io")
        #expect(r.repository == "library/python")
        #expect(r.tag == "3.12-slim")
        #expect(r.apiHost == "registry-1.docker.io")
        #expect(!r.isLoopback)
        #expect(r.description == "docker.io/library/python:3.12-slim")
        #expect(try RegistryReference(parsing: "ubuntu").tag == "latest")
        #expect(try RegistryReference(parsing: "someone/tool:v1").repository == "someone/tool")
    }

    @Test func registryHostsPortsAndDigests() throws {
        let hex = String(repeating: "ab", count: 32)
        let r = try RegistryReference(parsing: "localhost:5000/team/app@sha256:\(hex)")
        #expect(r.domain == "localhost:5000")
        #expect(r.repository == "team/app")
        #expect(r.tag == nil)
        #expect(r.digest?.hex == hex)
        #expect(r.isLoopback)
        #expect(r.manifestReference == "sha256:\(hex)")
        #expect(try RegistryReference(parsing: "127.0.0.1:5000/x:1").isLoopback)
        #expect(try RegistryReference(parsing: "ghcr.io/o/r:t").apiHost == "ghcr.io")
        guard case .registry(let d) = try ImageReference(parsing: "docker://alpine:3") else {
            Issue.record("not a registry ref"); return
        }
        #expect(d.repository == "library/alpine")
    }

    @Test func localTransports() throws {
        #expect(try ImageReference(parsing: "oci:/tmp/lay:v2") == .ociLayout(path: "/tmp/lay", tag: "v2"))
        #expect(try ImageReference(parsing: "oci:/tmp/lay") == .ociLayout(path: "/tmp/lay", tag: nil))
        #expect(try ImageReference(parsing: "docker-archive:/tmp/a.tar") == .dockerArchive(path: "/tmp/a.tar"))
    }

    @Test(arguments: [
        "", "Python:3", "a//b", "-x", "x:bad tag", "x@sha256:12", "x@md5:" + String(repeating: "a", count: 32), "oci:",
    ])
    func badReferencesAreRefused(_ s: String) {
        #expect(throws: FurcateError.self) { try ImageReference(parsing: s) }
    }
}
