import Foundation
import FurcateCore
import FurcateEngine
import Hummingbird
import Testing

@testable import APIServer

/// Request bodies decoded and checked in one place, and each dialect's rendering of what is
/// wrong with one: no server, no VM.
@Suite struct RequestBodyTests {
    func decode<T: JSONBody>(_ type: T.Type, _ json: String) throws -> T {
        try RequestBodies.decode(type, from: Data(json.utf8))
    }

    func problem<T: JSONBody>(_ type: T.Type, _ json: String) -> FieldProblem? {
        do {
            _ = try decode(type, json)
            return nil
        } catch let p as FieldProblem {
            return p
        } catch {
            Issue.record("\(json): not a FieldProblem: \(error)")
            return nil
        }
    }

    /// JSON types are checked by the decoder, not by hand: a boolean or a fraction is not an
    /// integer, and the problem names the field.
    @Test func typesAndRangesNameTheField() throws {
        #expect(try decode(FreestyleRoutes.ForkVmRequest.self, "").count == nil, "an empty body is {}")
        #expect(try decode(FreestyleRoutes.ForkVmRequest.self, #"{"count": 7}"#).count == 7)
        #expect(
            problem(FreestyleRoutes.ForkVmRequest.self, #"{"count": true}"#)
                == FieldProblem(["count"], .wrongType(.integer)))
        #expect(
            problem(FreestyleRoutes.ForkVmRequest.self, #"{"count": 1.5}"#)
                == FieldProblem(["count"], .wrongType(.integer)))
        #expect(
            problem(FreestyleRoutes.ForkVmRequest.self, #"{"count": 0}"#)
                == FieldProblem(["count"], .outOfRange(1...100, value: 0)))
        #expect(problem(FreestyleRoutes.ForkVmRequest.self, #"[1]"#) == FieldProblem([], .notAnObject))
        #expect(problem(FreestyleRoutes.ForkVmRequest.self, #"{"count": "#) == FieldProblem([], .notAnObject))
        #expect(problem(FreestyleRoutes.ExecAwaitRequest.self, #"{}"#) == FieldProblem(["command"], .missing))
        #expect(
            problem(FreestyleRoutes.ExecAwaitRequest.self, #"{"command": "x", "timeoutMs": -1}"#)?.path == ["timeoutMs"]
        )
    }

    /// A field this server does not honour is refused by name; one the vendor documents may
    /// be sent as null (unset), never with a value.
    @Test func unknownFieldsAreRefusedNotIgnored() throws {
        let extra = problem(FreestyleRoutes.ForkVmRequest.self, #"{"count": 2, "zeta": 1, "alpha": null}"#)
        #expect(extra == FieldProblem([], .unsupported(fields: ["alpha", "zeta"], supported: ["count"])))
        _ = try decode(FreestyleRoutes.VMSettings.self, #"{"activityThresholdBytes": null, "idleTimeoutSeconds": 60}"#)
        #expect(
            problem(FreestyleRoutes.VMSettings.self, #"{"activityThresholdBytes": 5}"#)?.kind
                == .unsupported(
                    fields: ["activityThresholdBytes"],
                    supported: ["idleTimeoutSeconds", "readySignalTimeoutSeconds", "waitForReadySignal"]))
        // Nested objects check their own fields, with the path to them.
        let nested = problem(
            InstaVMRoutes.CreateSnapshotRequest.self, #"{"oci_image": "a/b:1", "build_args": {"bogus": 1}}"#)
        #expect(nested?.path == ["build_args"])
        #expect(
            nested?.kind
                == .unsupported(
                    fields: ["bogus"], supported: InstaVMRoutes.CreateSnapshotRequest.BuildArgs.fields.sorted()))
    }

    /// CreateVmRequest: the VmSpec's label must be a string (found by schemathesis), the
    /// deprecated template and gitRepos become today's spec.snapshot and git.repos, and a
    /// persistence has only its type's fields.
    @Test func createVmRequestShapes() throws {
        typealias Create = FreestyleRoutes.CreateVmRequest
        #expect(
            problem(Create.self, #"{"spec": {"name": {}}}"#) == FieldProblem(["spec", "name"], .wrongType(.string)))
        #expect(problem(Create.self, #"{"spec": 3}"#) == FieldProblem(["spec"], .wrongType(.object)))
        #expect(try decode(Create.self, "{}").contents == nil)
        #expect(try decode(Create.self, "{}").persistence == .sticky(priority: 5))

        let legacy = try decode(
            Create.self,
            #"{"template": {"workdir": "/app", "persistence": {"type": "persistent"}, "gitRepos": [{"repo": "r", "path": "/r"}]}}"#
        )
        #expect(legacy.persistence == .persistent)
        #expect(legacy.contents?.snapshot?.workdir == "/app", "the template is spec.snapshot")
        #expect(legacy.contents?.snapshot?.git?.repos?.map(\.repo) == ["r"])
        let repos = try decode(
            Create.self,
            #"{"gitRepos": [{"repo": "s", "path": "/s"}], "git": {"config": {}, "repos": [{"repo": "t", "path": "/t"}]}}"#
        )
        #expect(repos.contents?.git?.repos?.map(\.repo) == ["t", "s"])
        #expect(problem(Create.self, #"{"template": {}, "spec": {}}"#)?.path == ["template"])
        #expect(
            problem(Create.self, #"{"gitRepos": [], "git": {"config": {}, "repos": 1}}"#)
                == FieldProblem(["git", "repos"], .wrongType(.array)))

        // A layer on a snapshot: the request's own fields over its snapshotId.
        let layered = try decode(Create.self, #"{"snapshotId": "sn-1", "aptDeps": ["jq"], "idleTimeoutSeconds": 30}"#)
        #expect(
            layered.contents?.snapshotId == "sn-1" && layered.contents?.aptDeps == ["jq"]
                && layered.settings.idleTimeoutSeconds == 30)
        // The spec's outer layer gives settings the request leaves unset.
        let spec = try decode(
            Create.self,
            #"{"spec": {"snapshot": {"idleTimeoutSeconds": 9, "waitForReadySignal": false}}, "idleTimeoutSeconds": 4}"#)
        #expect(spec.settings.idleTimeoutSeconds == 4 && spec.settings.waitForReadySignal == false)

        let persistence = problem(Create.self, #"{"persistence": {"type": "persistent", "priority": 3}}"#)
        #expect(persistence?.path == ["persistence"] && persistence?.message.contains("'priority'") == true)
        #expect(problem(Create.self, #"{"persistence": {}}"#) == FieldProblem(["persistence", "type"], .missing))
    }

    /// Each dialect renders the same problem in its vendor's shape: Freestyle a 400 with a code,
    /// InstaVM a 422 with pydantic's loc, msg and type.
    @Test func dialectsRenderProblems() throws {
        let unsupported = FieldProblem(["build_args"], .unsupported(fields: ["bogus"], supported: ["envs"]))
        let free = try #require(FreestyleRoutes.render(unsupported) as? APIError)
        #expect(
            free.status == .badRequest && free.code == "UNSUPPORTED_FIELD"
                && free.message.contains("'build_args.bogus'"))
        let wrong = try #require(FreestyleRoutes.render(FieldProblem(["count"], .wrongType(.integer))) as? APIError)
        #expect(wrong.code == "BAD_REQUEST" && wrong.message == "count must be an integer")

        let insta = try #require(InstaVMRoutes.render(unsupported) as? InstaVMError)
        #expect(insta.status == .unprocessableContent)
        #expect(
            insta.items?.first?.loc == ["body", "build_args", "bogus"] && insta.items?.first?.type == "extra_forbidden")
        let range = try #require(
            InstaVMRoutes.render(FieldProblem(["memory_mb"], .outOfRange(128...8192, value: 64))) as? InstaVMError)
        #expect(
            range.items?.first?.msg == "Input should be greater than or equal to 128"
                && range.items?.first?.type == "greater_than_equal")
        let missing = try #require(InstaVMRoutes.render(FieldProblem(["session_id"], .missing)) as? InstaVMError)
        #expect(missing.items?.first?.loc == ["body", "session_id"] && missing.items?.first?.msg == "Field required")
    }
}

/// Multipart forms MultipartKit would trap on are refused before it sees them.
@Suite struct MultipartGuardTests {
    @Test func headerNamesMustBeASCII() {
        func body(_ s: [UInt8]) -> ByteBuffer { ByteBuffer(bytes: s) }
        let b = "19a0e0e526274f6bfdbd7f757b719798"
        // The request schemathesis sent: a part whose "header" starts with bytes above 0x7F.
        let crashing: [UInt8] =
            Array("--\(b)\r\n".utf8) + [0xC1, 0xB4, 0xF0, 0xBB, 0xA0, 0xA3] + Array("CY\u{1F}--\(b)--\r\n".utf8)
        #expect(!InstaVMRoutes.headerNamesAreASCII(body(crashing), boundary: b))
        // A real form: UTF-8 in a header value (a file name) and in the content is fine.
        let form = Array(
            ("--\(b)\r\nContent-Disposition: form-data; name=\"file\"; filename=\"é.txt\"\r\n\r\n"
                + "ünïcode --\(b)x\r\n"
                + "--\(b)\r\nContent-Disposition: form-data; name=\"remote_path\"\r\n\r\n/root/é\r\n--\(b)--\r\n").utf8)
        #expect(InstaVMRoutes.headerNamesAreASCII(body(form), boundary: b))
        let badName = Array("--\(b)\r\nContént-Disposition: form-data\r\n\r\nx\r\n--\(b)--\r\n".utf8)
        #expect(!InstaVMRoutes.headerNamesAreASCII(body(badName), boundary: b))
    }
}
