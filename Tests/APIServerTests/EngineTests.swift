import Foundation
import FurcateCore
import Hypervisor
import Testing
import VMService

@testable import FurcateEngine

/// The engine's rules on their own: no HTTP, no dialect.
@Suite struct EngineRuleTests {
    /// A terminal's output is read between the markers of this command's nonce, and only once
    /// the whole status line is there.
    @Test func terminalResultWaitsForTheWholeStatusLine() {
        // The terminal echoes the typed line first: its markers are escapes there, not bytes.
        let echoed =
            #"$ printf '\036S%s\n' n1; command eval "$(printf %s 'ZWNobw==' | base64 -d)"; printf '\036E%s:%d\n' n1 "$?""#
            + "\r\n"
        let body = echoed + "\u{1E}Sn1\r\nhello\r\nworld\r\n\u{1E}En1:1"
        #expect(Engine.terminalResult(Data(body.utf8), nonce: "n1") == nil, "the status may have more digits to come")
        let done = Engine.terminalResult(Data((body + "2\r\n").utf8), nonce: "n1")
        #expect(done == TerminalExecResult(output: "hello\nworld\n", status: 12))
        // An earlier command's markers (another nonce) are not this command's answer.
        #expect(Engine.terminalResult(Data("\u{1E}Sold\r\nx\r\n\u{1E}Eold:0\r\n".utf8), nonce: "n1") == nil)
        // Output that scrolled the start marker away: everything before the end marker.
        #expect(
            Engine.terminalResult(Data("tail\r\n\u{1E}En1:0\r\n".utf8), nonce: "n1")
                == TerminalExecResult(output: "tail\n", status: 0))
    }

    /// Persistence kinds keep the document's JSON shape, default the priority, and refuse what
    /// is out of range or unknown with `.invalidArgument` naming the field.
    @Test func persistenceKindsDecodeAndRefuse() throws {
        func vm(_ s: String) throws -> VMPersistence {
            try JSONDecoder().decode(VMPersistence.self, from: Data(s.utf8))
        }
        func snap(_ s: String) throws -> SnapshotPersistence {
            try JSONDecoder().decode(SnapshotPersistence.self, from: Data(s.utf8))
        }
        #expect(try vm(#"{"type":"sticky"}"#) == .sticky(priority: 5))
        #expect(try vm(#"{"type":"ephemeral","deleteEvent":"OnStop"}"#) == .ephemeral(deleteEvent: .onStop))
        #expect(try vm(#"{"type":"ephemeral"}"#).deletedOnSuspend)
        #expect(try snap(#"{"type":"persistent"}"#) == .persistent)
        for (bad, field) in [
            (#"{"type":"sticky","priority":11}"#, "priority"), (#"{"type":"forever"}"#, "type"),
            (#"{"type":"ephemeral","deleteEvent":"Never"}"#, "deleteEvent"),
        ] {
            do {
                _ = try vm(bad)
                Issue.record("\(bad) was accepted")
            } catch let e as FurcateError {
                #expect(e.code == .invalidArgument && e.message.contains(field), "\(e)")
            }
        }
        #expect(throws: FurcateError.self) { try snap(#"{"type":"ephemeral"}"#) }
        // What is stored reads back the same.
        for p: VMPersistence in [
            .persistent, .sticky(priority: 0), .ephemeral(deleteEvent: .onSuspend), .ephemeral(deleteEvent: nil),
        ] {
            #expect(try vm(String(decoding: JSONEncoder().encode(p), as: UTF8.self)) == p)
        }
    }
}

/// The engine's use cases with real VMs, without HTTP: ownership, forks, snapshots, waking.
@Suite(.enabled(if: apiVMAvailable)) struct EngineUseCaseTests {
    @Test(.timeLimit(.minutes(5))) func useCasesKeepOwnershipPoliciesAndState() async throws {
        try await withAPIHarness { h in
            try await h.makeSnapshot()
            let e = h.engine
            // Another account cannot boot a's snapshot, nor see a's VM.
            await #expect(throws: FurcateError.self) { _ = try await e.bootable(.snapshot(h.snapshot), account: "b") }
            let policy = VMPolicy(persistence: .ephemeral(deleteEvent: .onStop), idleTimeoutSeconds: 42)
            let vm = try await e.createVM(
                NewVM(
                    account: "a", snapshot: try await e.bootable(.snapshot(h.snapshot), account: "a"), name: "parent",
                    policy: policy, environment: ["GREETING": "hi"]))
            #expect(try await e.ownedVM(vm.id, account: "b") == nil)
            #expect(try await e.ownedVM(vm.id, account: "a")?.id == vm.id)
            #expect(e.owners.name(vm.id) == "parent")
            guard case .file(let env) = try await e.readFile(vm, "/.furcate/env", wake: .requireRunning) else {
                Issue.record("the environment file is not a file")
                return
            }
            #expect(String(decoding: env, as: UTF8.self).contains("GREETING=hi"))

            // Forks are the caller's, with the parent's policy; the snapshot taken is recorded.
            let (forks, snap) = try await e.fork(vm, account: "a", count: 2, snapshotName: "fork-point")
            #expect(forks.count == 2 && snap.account == "a" && snap.name == "fork-point")
            for f in forks {
                #expect(e.owners.owner(f.id) == "a")
                #expect(try await e.policies.policy(f.id) == policy)
            }
            let named = try await e.snapshot(vm, account: "a", name: "kept", persistence: .persistent, kind: .user)
            #expect(try e.owners.snapshot(named.id)?.persistence == .persistent)

            // The account's VMs with their names and policies; another account has none.
            let listed = try await e.vms(of: "a")
            #expect(Set(listed.map(\.vm.id)) == Set([vm.id] + forks.map(\.id)))
            #expect(listed.first { $0.vm.id == vm.id }?.name == "parent")
            #expect(listed.allSatisfy { $0.policy == policy })
            #expect(try await e.vms(of: "b").isEmpty)
            try await e.setIdleTimeout(vm.id, seconds: 7)
            #expect(try await e.policies.policy(vm.id)?.idleTimeoutSeconds == 7)

            // A suspended VM: InstaVM's rule refuses, Freestyle's wakes it.
            let suspended = try await e.suspend(forks[0])
            do {
                _ = try await e.guest(suspended, wake: .requireRunning)
                Issue.record("a suspended VM was handed out")
            } catch let err as FurcateError {
                #expect(err.code == .vmNotRunning, "\(err)")
            }
            _ = try await e.guest(suspended, wake: .resumeSuspended)
            let woken = try await e.vms.info(forks[0].id)
            #expect(woken.state == .running)
            // Starting a running VM leaves it as it is; a stopped one does not stop again.
            #expect(try await e.start(woken).state == .running)
            let stopped = try await e.kill(woken)
            #expect(stopped.state == .stopped)
            do {
                _ = try await e.stop(stopped)
                Issue.record("a stop of a stopped VM succeeded")
            } catch let err as FurcateError {
                #expect(err.code == .vmNotRunning, "\(err)")
            }

            // Forgetting a VM drops its record, owner, policy and runtime.
            try await e.forgetVM(forks[1].id)
            let leftPolicy = try await e.policies.policy(forks[1].id)
            #expect(e.owners.owner(forks[1].id) == nil && leftPolicy == nil)
            #expect(!(await e.vms.instanceIDs().contains(forks[1].id)))
        }
    }

    /// A VM that cannot be given everything it was asked for (here: its environment, since the
    /// snapshot's environment file is a directory) is deleted again: no VM, owner or policy.
    @Test(.timeLimit(.minutes(5))) func createVMLeavesNothingHalfMade() async throws {
        try await withAPIHarness { h in
            try await h.makeSnapshot()
            let e = h.engine
            let base = try await e.vms.create(CreateVMRequest(snapshot: h.snapshot))
            try await e.vms.agent(base.id, timeout: .seconds(60)).makeDirectory(AgentClient.environmentFile)
            let broken = try await e.vms.snapshot(base.id).id
            try await e.vms.delete(base.id)
            let before = Set(await e.vms.list().map(\.id))
            let policy = VMPolicy(persistence: .sticky(priority: 5), idleTimeoutSeconds: 0)
            await #expect(throws: (any Error).self) {
                _ = try await e.createVM(NewVM(account: "a", snapshot: broken, policy: policy, environment: ["A": "1"]))
            }
            let after = await e.vms.list().map(\.id)
            #expect(Set(after) == before, "left behind: \(Set(after).subtracting(before))")
            #expect(e.owners.owned(by: "a").keys.allSatisfy { before.contains($0) || $0.hasPrefix("sc-") })
            let policies = try await e.policies.all()
            #expect(policies.keys.allSatisfy(before.contains))
            #expect(await e.vms.instanceIDs().isSubset(of: before))
        }
    }
}
