import BlockStore
import Foundation
import FurcateCore
import FurcateTestSupport
import GuestAgentProtocol
import Hypervisor
import Synchronization
import Testing
import VMNetwork
import VMService

#if canImport(Glibc)
    import Glibc
#endif

/// Real QEMU (TCG here), real FUSE mount, the test rootfs's shell on the guest channel.
@Suite(.enabled(if: vmAvailable, "needs root, /dev/fuse, QEMU and the guest artifacts"), .serialized)
struct VMServiceTests {
    /// A boot takes a host-wide slot from QEMU's start until its guest agent first answers:
    /// with the only slot held elsewhere (another process, as far as the service can tell) a
    /// create waits and makes nothing; then the VM boots and holds the slot until its agent
    /// answers; a VM deleted while it boots frees its slot too.
    // On a thread of its own: its 300 ms look at the slot must not resume late on a pool that
    // synchronous suites hold (a fresh-clone CI run resumed it after the agent had answered
    // and the slot was rightly free, and called that early).
    @Test(.timeLimit(.minutes(3)), .ownThread) func bootsWaitForAHostSlotAndHoldItUntilTheAgentAnswers() async throws {
        let slotTemp = TempDir("slots")
        let slotDir = slotTemp.path
        await withHarness(configure: {
            $0.concurrentBoots = 1; $0.slotDirectory = slotDir
        }) { _, svc in
            let other = HostSlots(name: "boot", count: 1, directory: slotDir)
            let held = try await other.acquire()
            let creating = Task { try await svc.create(CreateVMRequest(image: "rootfs")) }
            try await Task.sleep(for: .seconds(2))
            #expect(await svc.list().isEmpty, "a VM was made while every boot slot was held")
            held.release()
            let vm = try await creating.value
            let taken = Mutex(false)
            let waiting = Task {
                let s = try await other.acquire()
                taken.withLock { $0 = true }
                return s
            }
            try await Task.sleep(for: .milliseconds(300))  // the guest's kernel is still starting
            let early = taken.withLock { $0 }
            #expect(!early, "the boot let go of its slot before its agent answered")
            #expect(await svc.awaitFreshened(vm.id))
            let freed = try await waiting.value
            // The boot's agent connection is the VM's: it answers at once.
            let agent = try await svc.agent(vm.id, timeout: .seconds(5))
            #expect(try await agent.exec(ExecRequest(command: "echo up")).exitCode == 0)
            freed.release()

            let second = try await svc.create(CreateVMRequest(image: "rootfs"))
            try await svc.delete(second.id)
            let start = ContinuousClock.now
            let again = try await other.acquire()
            // Freed by the delete, not by the 60 s agent timeout that would free it otherwise (the
            // bound leaves room for a loaded CI host: a slot waiter there once resumed 28 s late).
            #expect(ContinuousClock.now - start < .seconds(45), "a deleted boot kept its slot")
            again.release()
        }
    }

    /// Boot, snapshot, fork 3: every fork continues the parent's memory (a running counter
    /// loop) and disk (a file written before the snapshot); what each writes afterwards to
    /// disk and memory no other VM sees.
    @Test(.timeLimit(.minutes(5))) func forksContinueTheParentAndAreIsolated() async throws {
        await withHarness { h, svc in
            let parent = try await svc.create(CreateVMRequest(image: "rootfs"))
            #expect(parent.state == .running)
            let sh = try await svc.guestShell(parent.id, timeout: .seconds(60))
            try await guest(sh, "echo parent > /root/disk-marker && sync")
            try await guest(sh, "echo parent > /tmp/mem-marker")
            try await guest(
                sh,
                "(i=0; while true; do i=$((i+1)); echo $i > /tmp/counter.new; mv /tmp/counter.new /tmp/counter; sleep 0.1; done) > /dev/null 2>&1 &"
            )
            let before =
                try await eventually {
                    let n = Int(try await guest(sh, "cat /tmp/counter 2>/dev/null || echo 0")) ?? -1
                    return n > 0 ? n : nil
                } ?? -1
            #expect(before > 0)

            let fork = try await svc.fork(parent.id, count: 3)
            #expect(fork.vms.count == 3)
            #expect(fork.snapshot.deviceStateBytes > 1000)
            #expect(Set(fork.vms.map(\.id)).count == 3 && !fork.vms.contains { $0.id == parent.id })
            var shells: [GuestShell] = []
            for (i, vm) in fork.vms.enumerated() {
                #expect(vm.state == .running && vm.parentSnapshot == fork.snapshot.id)
                let s: GuestShell
                do { s = try await svc.guestShell(vm.id) } catch {
                    Issue.record("fork \(i): \(error); \(await diagnose(svc, vm.id))")
                    throw error
                }
                shells.append(s)
                #expect(try await guest(s, "cat /root/disk-marker") == "parent")
                #expect(try await guest(s, "cat /tmp/mem-marker") == "parent")
                let c1 = Int(try await guest(s, "cat /tmp/counter")) ?? -1
                #expect(c1 >= before, "fork \(i) counter \(c1) < parent's \(before) before the snapshot")
                let c2 =
                    try await eventually(within: .seconds(30)) {
                        let n = Int(try await guest(s, "cat /tmp/counter")) ?? -1
                        return n > c1 ? n : nil
                    } ?? c1
                #expect(c2 > c1, "fork \(i)'s counter loop is not running (\(c1) then \(c2))")
                try await guest(s, "echo fork\(i) > /root/disk-marker && sync && echo fork\(i) > /tmp/mem-marker")
            }
            try await guest(sh, "echo parent2 > /tmp/mem-marker")
            #expect(try await guest(sh, "cat /root/disk-marker") == "parent")
            #expect(try await guest(sh, "cat /tmp/mem-marker") == "parent2")
            for (i, s) in shells.enumerated() {
                #expect(try await guest(s, "cat /root/disk-marker") == "fork\(i)")
                #expect(try await guest(s, "cat /tmp/mem-marker") == "fork\(i)")
            }
            // Each fork has its own QEMU, memory file and disk file.
            let pids = await withTaskGroup(of: Int32?.self) { g in
                for vm in fork.vms + [parent] { g.addTask { await svc.process(vm.id)?.pid } }
                return await g.reduce(into: [Int32?]()) { $0.append($1) }
            }
            #expect(Set(pids.compactMap { $0 }).count == 4)
            for vm in fork.vms { #expect(try h.store.exists(vm.memoryFile) && h.store.exists(vm.diskFile)) }
        }
    }

    /// Through the guest agent: exec and files in a real VM; forks asked for a new identity get
    /// different RNG output, their own hostname and machine-id, and a restore long after its
    /// snapshot shows the host's time, not the snapshot's.
    @Test(.timeLimit(.minutes(5))) func forksGetFreshEntropyClockAndIdentity() async throws {
        await withHarness { h, svc in
            let parent = try await svc.create(CreateVMRequest(image: "rootfs"))
            let agent = try await svc.agent(parent.id, timeout: .seconds(60))
            let r = try await agent.exec(ExecRequest(command: "echo hi from pid $$; cat /proc/uptime"))
            #expect(r.exitCode == 0 && String(decoding: r.stdout, as: UTF8.self).hasPrefix("hi from pid "))
            let blob = Data((0..<70_000).map { UInt8(truncatingIfNeeded: $0 &* 31) })
            _ = try await agent.request(
                .writeFile(path: "/root/blob", data: blob, offset: nil, mode: 0o600, createParents: false))
            guard
                case .data(let back, _) = try await agent.request(
                    .readFile(path: "/root/blob", offset: nil, length: nil))
            else {
                Issue.record("no data")
                return
            }
            #expect(back == blob)

            let fork = try await svc.fork(parent.id, count: 3, newIdentity: true)
            var randoms: Set<String> = []
            var machineIDs: Set<String> = []
            for vm in fork.vms {
                // Each fork's agent reseeded its CRNG (RNDADDENTROPY + RNDRESEEDCRNG) and set its
                // clock. (Distinct random bytes alone would not prove it in a guest this young:
                // its kernel still reseeds every few seconds by itself.)
                #expect(await svc.awaitFreshened(vm.id))
                let a = try await svc.agent(vm.id)
                // The guest's clock is read between these two host times (however slow a loaded
                // host makes the exec), give or take a second of rounding.
                let before = Int(Date().timeIntervalSince1970)
                let out = try await a.exec(
                    ExecRequest(
                        command: "head -c 16 /dev/urandom | od -An -tx1; hostname; cat /etc/machine-id; date +%s"))
                let after = Int(Date().timeIntervalSince1970.rounded(.up))
                let lines = String(decoding: out.stdout, as: UTF8.self).split(separator: "\n").map {
                    $0.trimmingCharacters(in: .whitespaces)
                }
                #expect(lines.count == 4, "\(lines)")
                guard lines.count == 4 else { continue }
                randoms.insert(lines[0])
                #expect(lines[1] == vm.id)
                machineIDs.insert(lines[2])
                let guestNow = Int(lines[3]) ?? 0
                #expect((before - 1)...(after + 1) ~= guestNow, "guest \(guestNow), host \(before)...\(after)")
            }
            #expect(randoms.count == 3, "forks read the same random bytes: \(randoms)")
            #expect(machineIDs.count == 3)

            // A restore 4 s after its snapshot: the guest clock is set to the host's.
            let snap = try await svc.snapshot(parent.id)
            try await Task.sleep(for: .seconds(4))
            let late = try await svc.create(CreateVMRequest(snapshot: snap.id))
            let a = try await svc.agent(late.id)
            let asked = Int(Date().timeIntervalSince1970)
            let now = try await a.exec(ExecRequest(argv: ["date", "+%s"]))
            let answered = Int(Date().timeIntervalSince1970)
            let guestNow =
                Int(String(decoding: now.stdout, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0
            // Between asking and the answer (a loaded host can take seconds over the exec), give or take 1 s.
            #expect(
                guestNow >= asked - 1 && guestNow <= answered + 1,
                "guest clock \(guestNow), host \(asked)...\(answered)")
        }
    }

    /// What a fork does first it should not do into pages of its own (mode b) when its parent
    /// could have done it once before the snapshot:
    /// - the freshening: a booted VM's first snapshot has its agent run it first. The first
    ///   one in a guest's life faults memory in (the agent's heap and stacks grow, code and
    ///   data are set up on first use). Counted: the agent's page faults (minflt) in the fork
    ///   after its freshening, against its parent's after the fork; both then run the same
    ///   command to read them.
    /// - announcing itself on the network after the restore (QEMU's default, 5 rounds).
    @Test(.timeLimit(.minutes(5))) func aForkDoesNotRedoWhatItsParentDid() async throws {
        await withHarness { h, svc in
            let parent = try await svc.create(CreateVMRequest(image: "rootfs"))
            func agentFaults(_ agent: AgentClient) async throws -> Int {
                let r = try await agent.exec(ExecRequest(command: "cat /proc/$PPID/stat"))
                let stat = String(decoding: r.stdout, as: UTF8.self)
                // pid (comm) state ppid ... : minflt is the 10th field, the 8th after "(comm)".
                guard let close = stat.lastIndex(of: ")") else { return -1 }
                let fields = stat[stat.index(after: close)...].split(separator: " ")
                return fields.count > 7 ? Int(fields[7]) ?? -1 : -1
            }
            let agent = try await svc.agent(parent.id, timeout: .seconds(60))
            #expect(try await agentFaults(agent) > 0)
            let fork = try await svc.fork(parent.id, count: 1, memoryMode: .privateBase)
            let params = try await #require(await svc.process(fork.vms[0].id)).qmp.execute("query-migrate-parameters")
            #expect(params["announce-rounds"]?.int == 0)
            let parentAfter = try await agentFaults(agent)
            let forkAgent = try await svc.agent(fork.vms[0].id)
            #expect(await svc.awaitFreshened(fork.vms[0].id))
            let forkAfter = try await agentFaults(forkAgent)
            #expect(
                parentAfter > 0 && forkAfter - parentAfter <= 2,
                "the fork's agent faulted \(forkAfter - parentAfter) pages more than its parent's")
        }
    }

    /// The agent in a real VM: it comes back when killed (its supervisor restarts it), runs a
    /// service that is restarted after SIGKILL, freezes and thaws the rootfs, and a graceful
    /// shutdown through it powers the VM off (QEMU exits cleanly: the VM is stopped).
    /// A fork whose freshening gave up (here: 1 ms for its agent to answer; in the benchmark,
    /// 32 forks restored at once on 2 cores took 22 s) is freshened before anything reaches it
    /// through the service: the retry gives it its new identity too.
    @Test(.timeLimit(.minutes(5))) func aFresheningThatGaveUpIsRetriedBeforeTheAgentIsUsed() async throws {
        await withHarness(configure: { $0.agentTimeout = .milliseconds(1) }) { h, svc in
            let parent = try await svc.create(CreateVMRequest(image: "rootfs"))
            let sh = try await svc.guestShell(parent.id, timeout: .seconds(60))
            #expect(try await guest(sh, "hostname") == "furcate-test")
            let fork = try await svc.fork(parent.id, count: 1, newIdentity: true)
            let id = fork.vms[0].id
            #expect(await svc.awaitFreshened(id) == false, "the first freshening should have given up after 1 ms")
            let agent = try await svc.agent(id, timeout: .seconds(60))
            #expect(await svc.awaitFreshened(id))
            let r = try await agent.exec(ExecRequest(command: "hostname"))
            #expect(String(decoding: r.stdout, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines) == id)
        }
    }

    /// With no host connected, the agent sleeps until the driver signals a connection (it
    /// used to read its port again every 10 ms, ~100 wakeups a second in every idle VM); a
    /// host that connects is served at once.
    @Test(.timeLimit(.minutes(5))) func agentSleepsUntilTheHostConnects() async throws {
        await withHarness { h, svc in
            let vm = try await svc.create(CreateVMRequest(image: "rootfs"))
            let sh = try await svc.guestShell(vm.id, timeout: .seconds(60))
            let agent = try await svc.agent(vm.id, timeout: .seconds(60))
            guard case .pong = try await agent.request(.ping) else { Issue.record("no pong"); return }
            agent.close()
            let switches =
                "for p in $(\(agentPIDs)); do grep '^voluntary_ctxt_switches' /proc/$p/status; done | awk '{n += $2} END {print n}'"
            try await Task.sleep(for: .milliseconds(500))
            let before = try #require(Int(try await guest(sh, switches)))
            try await Task.sleep(for: .seconds(3))
            let after = try #require(Int(try await guest(sh, switches)))
            // Polling every 10 ms would be ~300 in 3 s; waiting on SIGIO (1 s at most) is ≤ ~6.
            #expect(after - before < 30, "the agent woke \(after - before) times in 3 s with no host connected")
            let again = try await svc.agent(vm.id, timeout: .seconds(30))
            guard case .pong = try await again.request(.ping) else {
                Issue.record("no pong after reconnecting"); return
            }
        }
    }

    /// The test image's debug shell (served by `furcate-agent --shell-on`) starts a shell only
    /// when the host connects: with no host the port reads end-of-file at once, and a shell
    /// restarted in a loop every 50 ms kept an idle VM's QEMU at ~30% of a host CPU.
    @Test(.timeLimit(.minutes(5))) func debugShellSleepsUntilTheHostConnects() async throws {
        await withHarness { _, svc in
            let vm = try await svc.create(CreateVMRequest(image: "rootfs"))
            let lastPID = "cut -d' ' -f5 /proc/loadavg | cut -d/ -f2"
            let before = try #require(Int(try await guest(svc.guestShell(vm.id, timeout: .seconds(60)), lastPID)))
            try await Task.sleep(for: .seconds(2))  // the session above has ended: no host
            let sh = try await svc.guestShell(vm.id, timeout: .seconds(30))
            let after = try #require(Int(try await guest(sh, lastPID)))
            // The new session and its commands start a few processes; the loop started ~80.
            #expect(after - before < 20, "\(after - before) processes started in 2 s with no host on the shell port")
            try await guest(sh, "echo still > /tmp/x")
            #expect(try await guest(sh, "cat /tmp/x") == "still")
        }
    }

    @Test(.timeLimit(.minutes(5))) func agentSurvivesServicesRunAndShutdownStopsTheVM() async throws {
        await withHarness { h, svc in
            let vm = try await svc.create(CreateVMRequest(image: "rootfs"))
            let sh = try await svc.guestShell(vm.id, timeout: .seconds(60))
            let agent = try await svc.agent(vm.id, timeout: .seconds(60))
            guard case .pong = try await agent.request(.ping) else { Issue.record("no pong"); return }
            // Two agent processes: the supervisor (older) and the one serving. Kill the server.
            let before = try await guest(sh, "\(agentPIDs) | sort -n | tr '\\n' ' '").split(separator: " ")
            #expect(before.count == 2, "agent processes: \(before)")
            let serving = try #require(before.last)
            try await guest(sh, "kill -9 \(serving)")
            agent.close()
            let again = try await svc.agent(vm.id, timeout: .seconds(30))
            guard case .pong = try await again.request(.ping) else {
                Issue.record("no pong after the agent was killed"); return
            }
            let after = try await guest(sh, "\(agentPIDs) | sort -n | tr '\\n' ' '").split(separator: " ")
            #expect(
                after.count == 2 && after.first == before.first && !after.contains(serving),
                "before \(before), after \(after)")

            _ = try await again.request(
                .serviceCreate(
                    ServiceSpec(
                        name: "ticker", mode: "service", exec: ["while true; do date +%s; sleep 1; done"],
                        restartPolicy: RestartPolicy(policy: "always")), start: true))
            // The supervisor starts the main process on its own thread: poll for its pid.
            var mainPID: Int32?
            for _ in 0..<300 where mainPID == nil {
                if case .service(let st) = try await again.request(.serviceStatus(name: "ticker")) {
                    mainPID = st.mainPID
                }
                if mainPID == nil { try await Task.sleep(for: .milliseconds(100)) }
            }
            guard let pid = mainPID else {
                Issue.record("service not running after 30 s")
                return
            }
            try await guest(sh, "kill -9 \(pid)")
            var restarted = false
            for _ in 0..<300 where !restarted {
                try await Task.sleep(for: .milliseconds(100))
                if case .service(let s2) = try await again.request(.serviceStatus(name: "ticker")), s2.restarts >= 1,
                    s2.subState == "running"
                {
                    restarted = true
                }
            }
            #expect(restarted)

            _ = try await again.request(.freeze(mountPoints: ["/"], frozen: true))
            _ = try await again.request(.freeze(mountPoints: ["/"], frozen: false))
            #expect(try await guest(sh, "echo ok > /root/after-thaw && cat /root/after-thaw") == "ok")

            _ = try await again.request(.shutdown(graceSeconds: 1))
            let exited = try await svc.awaitExit(vm.id, timeout: .seconds(30))
            #expect(exited.state == .stopped)
            _ = h
        }
    }

    /// Memory mode b: forks map the snapshot's memory privately (one base file, one page
    /// cache); they continue the parent and stay isolated; a snapshot of such a fork carries
    /// its RAM in the stream and restores.
    @Test(.timeLimit(.minutes(5))) func privateMemoryForksShareOneBaseAndSnapshot() async throws {
        await withHarness { h, svc in
            let parent = try await svc.create(CreateVMRequest(image: "rootfs"))
            let sh = try await svc.guestShell(parent.id, timeout: .seconds(60))
            try await guest(sh, "echo parent > /tmp/mem-marker")
            let fork = try await svc.fork(parent.id, count: 2, memoryMode: .privateBase)
            let base = "/files/" + fork.snapshot.privateBaseFile
            for (i, vm) in fork.vms.enumerated() {
                #expect(vm.memoryMode == .privateBase)
                let s = try await svc.guestShell(vm.id)
                #expect(try await guest(s, "cat /tmp/mem-marker") == "parent")
                try await guest(s, "echo fork\(i) > /tmp/mem-marker")
                let pid = try #require(await svc.process(vm.id)?.pid)
                let maps = readWholeFile("/proc/\(pid)/maps") ?? ""
                #expect(maps.contains(base), "fork \(i) does not map \(base)")
                #expect(try !h.store.exists(vm.memoryFile))
            }
            for (i, vm) in fork.vms.enumerated() {
                #expect(try await guest(try await svc.guestShell(vm.id), "cat /tmp/mem-marker") == "fork\(i)")
            }
            #expect(try await guest(sh, "cat /tmp/mem-marker") == "parent")
            // The base file is untouched by the forks' writes: a private mapping.
            #expect(
                try h.store.file(fork.snapshot.privateBaseFile).hasSameContents(
                    as: h.store.file(fork.snapshot.memoryFile)))

            let snap = try await svc.snapshot(fork.vms[0].id)
            #expect(snap.ramInStream && snap.deviceStateBytes > 1 << 20)
            let restored = try await svc.create(CreateVMRequest(snapshot: snap.id))
            #expect(restored.memoryMode == .shared)
            #expect(try await guest(try await svc.guestShell(restored.id), "cat /tmp/mem-marker") == "fork0")
        }
    }

    /// With a warm pool, a fork takes a QEMU already waiting on its (empty) memory and disk
    /// files: no spawn on the fork path, and the fork still continues the parent and is isolated.
    @Test(.timeLimit(.minutes(5))) func warmPoolForksSkipProcessStart() async throws {
        let left = await withHarness(warmPool: 1) { h, svc in
            let parent = try await svc.create(CreateVMRequest(image: "rootfs"))
            let sh = try await svc.guestShell(parent.id, timeout: .seconds(60))
            try await guest(sh, "echo one > /root/disk-marker && sync && echo one > /tmp/mem-marker")
            let first = try await svc.fork(parent.id, count: 1)
            #expect(first.timings[0].spawn > .zero)
            // The pool refills in the background after the first fork of this shape.
            let deadline = ContinuousClock.now + .seconds(30)
            while await svc.poolCount() < 1 && ContinuousClock.now < deadline {
                try await Task.sleep(for: .milliseconds(50))
            }
            #expect(await svc.poolCount() == 1)
            try await guest(sh, "echo two > /root/disk-marker && sync && echo two > /tmp/mem-marker")
            let second = try await svc.fork(parent.id, count: 1)
            #expect(second.timings[0].spawn == .zero, "the fork did not come from the pool")
            let s = try await svc.guestShell(second.vms[0].id)
            #expect(try await guest(s, "cat /root/disk-marker") == "two")
            #expect(try await guest(s, "cat /tmp/mem-marker") == "two")
            try await guest(s, "echo pooled > /tmp/mem-marker && echo pooled > /root/disk-marker && sync")
            #expect(try await guest(sh, "cat /tmp/mem-marker; cat /root/disk-marker") == "two\ntwo")
            let s1 = try await svc.guestShell(first.vms[0].id)
            #expect(try await guest(s1, "cat /tmp/mem-marker; cat /root/disk-marker") == "one\none")
        }
        #expect(!left.contains { $0.hasPrefix("vm-") }, "pooled VM files left: \(left)")
    }

    /// A drain (shutdown) while the pool refills after a fork ends the pool for good: no QEMU
    /// started by the refill outlives it (one did, and held a lazily unmounted store open).
    @Test(.timeLimit(.minutes(5))) func drainingStopsARefillInProgress() async throws {
        let left = await withHarness(warmPool: 2) { h, svc in
            let parent = try await svc.create(CreateVMRequest(image: "rootfs"))
            _ = try await svc.guestShell(parent.id, timeout: .seconds(60))
            let fork = try await svc.fork(parent.id, count: 1)  // starts refilling 2 in the background
            await svc.drainWarmPool()
            try await Task.sleep(for: .seconds(3))  // a refill that went on would have spawned by now
            #expect(await svc.poolCount() == 0)
            let names = try h.store.list().map(\.name).filter { $0.hasPrefix("vm-") }
            let known = [parent.id, fork.vms[0].id]
            #expect(
                names.allSatisfy { n in known.contains { n.hasPrefix("vm-\($0)") } },
                "files of pooled QEMUs after the drain: \(names)")
        }
        #expect(!left.contains { $0.hasPrefix("vm-") }, "VM files left: \(left)")
    }

    /// Suspend ends the process and keeps everything in the store; resume brings back the
    /// same guest, its background process still alive.
    /// Snapshot memory compression (hypeman's model) runs in the background while a restore of
    /// the same snapshot reads the memory; the fork runs, the sizes are reported.
    @Test(.timeLimit(.minutes(5))) func snapshotMemoryCompressesWhileForksRestore() async throws {
        await withHarness { h, svc in
            let parent = try await svc.create(CreateVMRequest(image: "rootfs"))
            let agent = try await svc.agent(parent.id, timeout: .seconds(60))
            // Compressible guest memory: text in the page cache (not /tmp: the test init mounts a
            // tmpfs there, possibly after the agent already answers).
            let w = try await agent.exec(
                ExecRequest(
                    command: "yes 'furcate snapshot memory' | head -c 16000000 > /root/text && wc -c < /root/text",
                    timeoutMs: 60_000))
            #expect(
                w.exitCode == 0 && String(decoding: w.stdout, as: UTF8.self).contains("16000000"),
                "\(w) \(String(decoding: w.stderr, as: UTF8.self))")
            let snap = try await svc.snapshot(parent.id)
            let before = try await svc.snapshotMemoryStats(snap.id)
            let started = try await svc.setSnapshotCompression(
                snap.id, SnapshotCompression(enabled: true, algorithm: "zstd", level: 3))
            #expect(started.compressionState == .compressing)
            let vm = try await svc.create(CreateVMRequest(snapshot: snap.id))  // restores while compressing
            let done = try await svc.awaitCompression(snap.id)
            #expect(done.compressionState == .compressed, "\(String(describing: done.compressionError))")
            let (raw, stored) = (try #require(done.uncompressedSizeBytes), try #require(done.compressedSizeBytes))
            #expect(
                raw == before.uncompressedBytes && stored < before.storedBytes,
                "zstd:3 beats the store's lz4: \(before) -> \(stored)")
            let a = try await svc.agent(vm.id)
            let r = try await a.exec(ExecRequest(command: "wc -c < /root/text"))
            #expect(
                String(decoding: r.stdout, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines) == "16000000",
                "\(String(decoding: r.stderr, as: UTF8.self))")
            // A second fork from the compressed snapshot runs too.
            let vm2 = try await svc.create(CreateVMRequest(snapshot: snap.id))
            _ = try await svc.agent(vm2.id)
            await #expect(throws: FurcateError.self) {
                try await svc.setSnapshotCompression(
                    snap.id, SnapshotCompression(enabled: true, algorithm: "lz4", level: 12))
            }
            await #expect(throws: FurcateError.self) {
                try await svc.setSnapshotCompression(snap.id, SnapshotCompression(enabled: true, algorithm: "brotli"))
            }
            _ = try await svc.setSnapshotCompression(snap.id, SnapshotCompression(enabled: false))
            #expect(try await svc.awaitCompression(snap.id).compressionState == CompressionState.none)
            try await svc.deleteSnapshot(snap.id)
        }
    }

    /// Forks suspended while their agents are still being freshened let go at once: each
    /// freshening fails on its closed channel. It used to ask again until the agent timeout,
    /// each ask failing without a wait — a spin that held a thread of the cooperative pool per
    /// fork, and with two forks both of this host's: nothing else ran (a server shutting down
    /// right after a fork took 10 s), and asking for a suspended fork's agent waited for it.
    /// A resume freshens them anew.
    @Test(.timeLimit(.minutes(3))) func forksSuspendedWhileBeingFreshenedLetGoAtOnce() async throws {
        await withHarness(configure: { $0.agentTimeout = .seconds(600) }) { _, svc in
            let vm = try await svc.create(CreateVMRequest(image: "rootfs"))
            _ = try await svc.guestShell(vm.id, timeout: .seconds(60))
            let forks = try await svc.fork(vm.id, count: 2).vms.map(\.id)
            for f in forks { _ = try await svc.suspend(f) }  // at once: their freshening is under way
            for f in forks {
                // Said at once, not after the agent timeout (the old freshening is moot).
                await #expect { _ = try await svc.agent(f) } throws: { ($0 as? FurcateError)?.code == .invalidState }
            }
            for f in forks {
                _ = try await svc.resume(f)
                #expect(await svc.awaitFreshened(f))
                let r = try await svc.agent(f).exec(ExecRequest(argv: ["/bin/sh", "-c", "echo $((6 * 7))"]))
                #expect(r.exitCode == 0 && String(decoding: r.stdout, as: UTF8.self) == "42\n")
            }
        }
    }

    @Test(.timeLimit(.minutes(5))) func suspendAndResumeKeepAProcessAlive() async throws {
        await withHarness { h, svc in
            let vm = try await svc.create(CreateVMRequest(image: "rootfs"))
            let sh = try await svc.guestShell(vm.id, timeout: .seconds(60))
            let pid = try await guest(sh, "sleep 10000 & echo $!")
            let qemu = try #require(await svc.process(vm.id)?.pid)
            let suspended = try await svc.suspend(vm.id)
            #expect(suspended.state == .suspended && suspended.pid == nil)
            #expect(!processExists(qemu))
            #expect(access(svc.runDirectory(vm.id) + "/qmp.sock", F_OK) != 0)
            #expect(try !h.store.exists(vm.memoryFile))
            await #expect(throws: FurcateError.self) { try await svc.snapshot(vm.id) }
            let (resumed, timing) = try await svc.resume(vm.id)
            #expect(resumed.state == .running && resumed.id == vm.id)
            #expect(timing.total > .zero)
            let sh2 = try await svc.guestShell(vm.id)
            #expect(try await guest(sh2, "kill -0 \(pid) && echo alive") == "alive")
        }
    }

    /// A host admits so many guest vCPUs at once: a fork, restore or resume past it is
    /// refused before anything is made (a fork all or none), and admitted again once a VM ends.
    @Test(.timeLimit(.minutes(5))) func capacityRefusesWhatDoesNotFitAndMakesNothing() async throws {
        await withHarness(configure: { $0.capacity = VMCapacity(vcpus: 2, memoryMiB: nil) }) { _, svc in
            func refused(_ body: () async throws -> Void) async -> String {
                do {
                    try await body()
                    return "admitted"
                } catch let e as FurcateError where e.code == .overCapacity { return e.message } catch {
                    return "\(error)"
                }
            }
            let a = try await svc.create(CreateVMRequest(image: "rootfs"))
            let tooMany = await refused { _ = try await svc.fork(a.id, count: 2) }
            #expect(tooMany.contains("2 more VMs") && tooMany.contains("3 guest vCPUs of 2"), "\(tooMany)")
            let (vmCount, snapCount) = (await svc.list().count, await svc.listSnapshots().count)
            #expect(vmCount == 1 && snapCount == 0, "a refused fork makes nothing")
            let fork = try await svc.fork(a.id, count: 1)
            let f = fork.vms[0]
            #expect(
                await refused { _ = try await svc.create(CreateVMRequest(snapshot: fork.snapshot.id)) }.contains(
                    "3 guest vCPUs of 2"))
            #expect(
                await refused { _ = try await svc.create(CreateVMRequest(image: "rootfs")) }.contains(
                    "3 guest vCPUs of 2"))
            _ = try await svc.suspend(f.id)
            let g = try await svc.create(CreateVMRequest(snapshot: fork.snapshot.id))
            #expect(await refused { _ = try await svc.resume(f.id) }.contains("3 guest vCPUs of 2"))
            #expect(try await svc.info(f.id).state == .suspended, "a refused resume leaves the VM suspended")
            _ = try await svc.kill(g.id)
            #expect(try await svc.resume(f.id).0.state == .running)
            #expect(await svc.list().filter { $0.state == .running }.count == 2)
        }
    }

    /// Pause and unpause keep the VM running (a paused VM's snapshot leaves it paused); a guest
    /// that powers off is seen by awaitExit as stopped, with nothing left behind.
    @Test(.timeLimit(.minutes(5))) func pauseUnpauseAndAwaitExit() async throws {
        await withHarness { h, svc in
            let vm = try await svc.create(CreateVMRequest(image: "rootfs"))
            let sh = try await svc.guestShell(vm.id, timeout: .seconds(60))
            let paused = try await svc.pause(vm.id)
            #expect(paused.state == .running && paused.paused)
            let p = try #require(await svc.process(vm.id))
            #expect(try await p.qmp.execute("query-status")["status"]?.string == "paused")
            _ = try await svc.snapshot(vm.id)
            // Still not running (QEMU calls it "postmigrate" after the device state went out).
            #expect(try await p.qmp.execute("query-status")["running"]?.bool == false)
            #expect(try await svc.unpause(vm.id).paused == false)
            #expect(try await guest(sh, "echo awake") == "awake")
            // Still running after 1 s: awaitExit times out and says so.
            #expect(try await svc.awaitExit(vm.id, timeout: .seconds(1)).state == .running)
            _ = try? await sh.run("poweroff -f", timeout: .seconds(2))
            let after = try await svc.awaitExit(vm.id, timeout: .seconds(30))
            #expect(after.state == .stopped)
            #expect(!processExists(p.pid))
            #expect(access(svc.runDirectory(vm.id) + "/qmp.sock", F_OK) != 0)
            await #expect(throws: FurcateError.self) { try await svc.pause(vm.id) }
        }
    }

    /// Stop and kill leave no QEMU, no socket and no memory file; a stopped VM keeps its disk.
    @Test(.timeLimit(.minutes(5))) func stopAndKillLeaveNothingBehind() async throws {
        await withHarness { h, svc in
            for graceful in [true, false] {
                let vm = try await svc.create(CreateVMRequest(image: "rootfs"))
                let qemu = try #require(await svc.process(vm.id)?.pid)
                let after = graceful ? try await svc.stop(vm.id) : try await svc.kill(vm.id)
                #expect(after.state == .stopped)
                #expect(!processExists(qemu))
                #expect(await svc.process(vm.id) == nil)
                for s in ["qmp.sock", "channel.sock"] { #expect(access(svc.runDirectory(vm.id) + "/" + s, F_OK) != 0) }
                #expect(try !h.store.exists(vm.memoryFile))
                #expect(try h.store.exists(vm.diskFile))
                // Stopping again is not an error; a snapshot of a stopped VM is.
                #expect(try await svc.kill(vm.id).state == .stopped)
                await #expect(throws: FurcateError.self) { try await svc.snapshot(vm.id) }
                try await svc.delete(vm.id)
                #expect(try !h.store.exists(vm.diskFile))
            }
            #expect(try h.store.list().map(\.name) == ["rootfs"])
        }
    }

    /// Every ending path tears a VM's runtime down (its `VMInstance`: process, agent connection,
    /// readiness): kill, QEMU's own death, suspend, delete, a failed restore and a pool discard
    /// each leave no instance behind.
    @Test(.timeLimit(.minutes(5))) func everyEndingPathLeavesNoRuntimeBehind() async throws {
        await withHarness(warmPool: 1) { h, svc in
            func settled(_ what: String, _ done: () async throws -> Bool) async throws {
                let deadline = ContinuousClock.now + .seconds(60)
                while try await !done() {
                    guard ContinuousClock.now < deadline else { throw FurcateError(.timedOut, "\(what) within 60 s") }
                    try await Task.sleep(for: .milliseconds(100))
                }
            }
            let a = try await svc.create(CreateVMRequest(image: "rootfs"))
            #expect(await svc.instanceIDs() == [a.id])
            _ = try await svc.agent(a.id, timeout: .seconds(60))
            let snap = try await svc.snapshot(a.id)
            _ = try await svc.kill(a.id)
            #expect(await svc.instanceIDs().isEmpty, "after kill")

            let b = try await svc.create(CreateVMRequest(snapshot: snap.id))
            let pb = try #require(await svc.process(b.id))
            Glibc.kill(pb.pid, SIGKILL)
            try await settled("the VM lost") { try await svc.info(b.id).state == .lost }
            #expect(!(await svc.instanceIDs().contains(b.id)), "after QEMU died by itself")

            // The restore refilled the pool: a pooled QEMU is an instance too, until taken.
            try await settled("a pooled QEMU") { await svc.poolCount() == 1 }
            #expect(await svc.instanceIDs().count == 1)
            let c = try await svc.create(CreateVMRequest(snapshot: snap.id))
            _ = try await svc.suspend(c.id)
            #expect(!(await svc.instanceIDs().contains(c.id)), "after suspend")
            try await svc.delete(c.id)
            let d = try await svc.create(CreateVMRequest(snapshot: snap.id))
            try await svc.delete(d.id)
            #expect(!(await svc.instanceIDs().contains(d.id)), "after deleting a running VM")

            // A restore whose device state QEMU refuses leaves nothing.
            let good = try damageDeviceState(h.store, snap)
            try await settled("the pool refilled after the last restore") { await svc.poolCount() == 1 }
            let before = await svc.instanceIDs()
            await #expect(throws: FurcateError.self) {
                try await svc.create(CreateVMRequest(snapshot: snap.id, memoryMode: .privateBase))
            }
            let after = await svc.instanceIDs()
            #expect(after.isSubset(of: before), "after a failed restore: \(after) of \(before)")

            await svc.drainWarmPool()
            #expect(await svc.instanceIDs().isEmpty, "after the pool was drained")
        }
    }

    /// A server that died leaves its pooled QEMUs running with no record of them: the next
    /// start finds them by their command lines and ends them, with their files.
    @Test(.timeLimit(.minutes(5))) func aDeadServersPooledQEMUsAreEndedAtTheNextStart() async throws {
        await withHarness(warmPool: 1) { h, svc in
            let vm = try await svc.create(CreateVMRequest(image: "rootfs"))
            _ = try await svc.guestShell(vm.id, timeout: .seconds(60))
            let snap = try await svc.snapshot(vm.id)
            _ = try await svc.create(CreateVMRequest(snapshot: snap.id))  // sends the pool refilling
            let deadline = ContinuousClock.now + .seconds(120)
            while await svc.poolCount() < 1 {
                guard ContinuousClock.now < deadline else { throw FurcateError(.timedOut, "the pool refilled") }
                try await Task.sleep(for: .milliseconds(100))
            }
            let known = Set(await svc.list().map(\.id))
            var pooled: [Int32] = []
            for id in await svc.instanceIDs() where !known.contains(id) {
                if let p = await svc.process(id) { pooled.append(p.pid) }
            }
            try #require(!pooled.isEmpty, "no pooled QEMU to leave behind")
            #expect(Set(svc.leftoverQEMUs().map(\.pid)).isSuperset(of: pooled))

            // The old service is gone without shutting down, as a killed server is: its QMP
            // connections closed (a QEMU's monitor takes one client; a living old service's
            // would keep the next one waiting).
            await svc.abandonAll()
            try h.restart()
            _ = await h.service.recover()
            let ended = ContinuousClock.now + .seconds(30)
            while pooled.contains(where: processExists), ContinuousClock.now < ended {
                try await Task.sleep(for: .milliseconds(100))
            }
            #expect(!pooled.contains(where: processExists), "pooled QEMUs \(pooled) outlived their server")
            // Left: the QEMUs of the two running VMs, taken over.
            let left = h.service.leftoverQEMUs()
            #expect(Set(left.map(\.id)) == known, "\(left)")
            for id in known { #expect(try await h.service.info(id).state == .running) }
            let names = try h.store.list().map(\.name).filter { $0.hasPrefix("vm-") }
            #expect(names.allSatisfy { known.contains(String($0.dropFirst(3).prefix(20))) }, "\(names)")
        }
    }

    /// A VM whose QEMU was killed from outside (as the kernel's OOM killer would) is lost with
    /// the reason, keeps its disk, and starts again from it: what the guest synced is there,
    /// what was only in its memory (its tmpfs) is not. A running VM is not started again; a
    /// stopped one starts the same way.
    @Test(.timeLimit(.minutes(5))) func aLostVMBootsAgainFromItsDisk() async throws {
        await withHarness { _, svc in
            let vm = try await svc.create(CreateVMRequest(image: "rootfs"))
            let sh = try await svc.guestShell(vm.id, timeout: .seconds(60))
            try await guest(sh, "echo synced > /root/kept && sync && echo volatile > /tmp/mem-marker")
            let p = try #require(await svc.process(vm.id))
            Glibc.kill(p.pid, SIGKILL)
            let deadline = ContinuousClock.now + .seconds(60)
            while try await svc.info(vm.id).state != .lost {
                guard ContinuousClock.now < deadline else { throw FurcateError(.timedOut, "the VM lost within 60 s") }
                try await Task.sleep(for: .milliseconds(100))
            }
            let lost = try await svc.info(vm.id)
            #expect(lost.lostReason?.contains("SIGKILL") == true, "\(lost.lostReason ?? "no reason")")
            #expect(lost.lostReason?.contains("start boots it again") == true)

            let started = try await svc.start(vm.id)
            #expect(started.state == .running && started.lostReason == nil && started.memoryMode == .shared)
            let sh2 = try await svc.guestShell(vm.id, timeout: .seconds(60))
            #expect(try await guest(sh2, "cat /root/kept") == "synced")
            #expect(try await guest(sh2, "cat /tmp/mem-marker 2>/dev/null || echo gone") == "gone")
            do {
                _ = try await svc.start(vm.id)
                Issue.record("a running VM was started again")
            } catch let e as FurcateError {
                #expect(e.code == .invalidState, "\(e)")
            }
            _ = try await svc.kill(vm.id)
            #expect(try await svc.start(vm.id).state == .running)
            let sh3 = try await svc.guestShell(vm.id, timeout: .seconds(60))
            #expect(try await guest(sh3, "cat /root/kept") == "synced")
        }
    }

    /// A corrupt device-state file fails the restore with a clear error; nothing of the new
    /// VM is left (no record, no process, no store file) and the snapshot stays usable.
    @Test(.timeLimit(.minutes(5))) func corruptDeviceStateFailsTheRestoreCleanly() async throws {
        await withHarness { h, svc in
            let vm = try await svc.create(CreateVMRequest(image: "rootfs"))
            _ = try await svc.guestShell(vm.id, timeout: .seconds(60))
            let snap = try await svc.snapshot(vm.id)
            let good = try damageDeviceState(h.store, snap)
            let before = try h.store.list().map(\.name).sorted()
            let vmsBefore = await svc.list().map(\.id)
            do {
                _ = try await svc.create(CreateVMRequest(snapshot: snap.id))
                Issue.record("restoring damaged device state succeeded")
            } catch let e as FurcateError {
                #expect(e.code == .hypervisor || e.code == .timedOut, "\(e)")
                #expect(e.message.contains("restoring VM"), "\(e)")
            }
            #expect(await svc.list().map(\.id) == vmsBefore)
            #expect(try h.store.list().map(\.name).sorted() == before)
            // The good stream restores.
            try h.store.delete(snap.stateFile)
            try h.store.createFile("good").write(good, at: 0)
            try h.store.snapshot("good", as: snap.stateFile)
            let restored = try await svc.create(CreateVMRequest(snapshot: snap.id))
            let sh = try await svc.guestShell(restored.id)
            #expect(try await guest(sh, "hostname") == "furcate-test")
        }
    }

    /// Restores start the guest as soon as the device state is in (QEMU's autostart; streams
    /// saved here carry no run state). A stream saved by an earlier version says the VM was
    /// paused, QEMU then leaves the restored guest paused, and the service resumes it.
    @Test(.timeLimit(.minutes(5))) func aStreamSavedWithThePausedRunStateStillRestoresRunning() async throws {
        // A QEMU told to store the run state in its streams, as earlier versions did (the
        // later -global wins).
        let dir = TempDir("qemu")
        let wrapper = dir.sub("qemu")
        try "#!/bin/sh\nexec \(QEMUProcess.binary) \"$@\" -global migration.store-global-state=on\n".write(
            toFile: wrapper, atomically: true, encoding: .utf8)
        chmod(wrapper, 0o755)
        await withHarness(configure: { $0.qemuBinary = wrapper }) { _, svc in
            let vm = try await svc.create(CreateVMRequest(image: "rootfs"))
            let sh = try await svc.guestShell(vm.id, timeout: .seconds(60))
            try await guest(sh, "echo before > /tmp/mem-marker")
            let fork = try await svc.fork(vm.id, count: 1)
            let s = try await svc.guestShell(fork.vms[0].id, timeout: .seconds(30))
            #expect(try await guest(s, "cat /tmp/mem-marker") == "before")
            #expect(try await svc.info(fork.vms[0].id).state == .running)
        }
    }

    /// A restarted server finds its VMs: those running at a graceful shutdown run again (the
    /// same guest), suspended ones stay suspended, and one whose server died under it is lost
    /// with its stale QEMU killed.
    @Test(.timeLimit(.minutes(5))) func restartRefindsRunningAndSuspendedVMs() async throws {
        await withHarness { h, _ in
            let a = try await h.service.create(CreateVMRequest(image: "rootfs"))
            let b = try await h.service.create(CreateVMRequest(image: "rootfs"))
            let sha = try await h.service.guestShell(a.id, timeout: .seconds(60))
            try await guest(sha, "echo remembered > /tmp/note")
            _ = try await h.service.suspend(b.id)
            // Three running at shutdown: suspended a few at a time, all of them.
            let forks = try await h.service.fork(a.id, count: 2).vms.map(\.id)
            await h.service.shutdown()
            #expect(await h.service.list().allSatisfy { $0.state == .suspended })

            try h.restart()
            let resumed = await h.service.recover()
            #expect(Set(resumed) == Set([a.id] + forks), "\(resumed)")
            #expect(try await h.service.info(a.id).state == .running)
            #expect(try await h.service.info(b.id).state == .suspended)
            var sh2: GuestShell? = try await h.service.guestShell(a.id, timeout: .seconds(60))
            #expect(try await guest(sh2!, "cat /tmp/note") == "remembered")

            // A server that died without shutting down (here: let go of its VMs, as a crashed
            // one does): the next one takes over the running VMs, their memory and processes
            // intact, the same QEMUs; a QEMU killed after that loses its VM with the reason.
            try await guest(sh2!, "mkdir -p /run/t && mount -t tmpfs tmpfs /run/t && echo in-tmpfs > /run/t/v")
            sh2 = nil  // the shell channel takes one client: a crashed server's would be closed
            let running = try #require(await h.service.process(a.id)?.pid)
            await h.service.detachAll()
            try h.restart()
            #expect(Set(await h.service.recover()) == Set([a.id] + forks))
            #expect(try await h.service.info(a.id).state == .running)
            #expect(await h.service.process(a.id)?.pid == running, "the same QEMU runs it")
            let sh3 = try await h.service.guestShell(a.id, timeout: .seconds(60))
            #expect(try await guest(sh3, "cat /run/t/v /tmp/note") == "in-tmpfs\nremembered")
            #expect(try await h.service.info(b.id).state == .suspended)
            for f in forks { _ = try await h.service.kill(f) }
            Glibc.kill(running, SIGKILL)
            let lostA = try await eventually(within: .seconds(30)) {
                let v = try await h.service.info(a.id)
                return v.state == .lost ? v : nil
            }
            #expect(
                lostA?.lostReason?.contains("taken over from a previous server") == true, "\(String(describing: lostA))"
            )
            #expect(try await eventually(within: .seconds(10)) { processExists(running) ? nil : true } == true)
            #expect(try await h.service.kill(a.id).state == .stopped)
        }
    }

    /// The filesystem holding the store fills up while a running VM is snapshotted: the
    /// snapshot fails saying the disk is full, the VM runs on with its memory as it was, the
    /// store checks clean, and once the VM is deleted and the store collected the space is
    /// back (and a snapshot of a new VM succeeds).
    @Test(.timeLimit(.minutes(5))) func aSnapshotIntoAFullStoreFailsCleanlyAndTheVMRunsOn() async throws {
        let dir = TempDir("fullstore")
        let fs = dir.sub("fs")
        try FileManager.default.createDirectory(atPath: fs, withIntermediateDirectories: true)
        try #require(
            mount("tmpfs", fs, "tmpfs", 0, "size=192m") == 0, "mount tmpfs: \(String(cString: strerror(errno)))")
        defer { umount2(fs, Int32(MNT_DETACH)) }
        func freeBytes() -> UInt64 {
            var st = statvfs()
            return statvfs(fs, &st) == 0 ? UInt64(st.f_bavail) * UInt64(st.f_frsize) : 0
        }
        let h = try VMHarness(storeDirectory: fs + "/store")
        do {
            let freeAtStart = freeBytes()
            let svc = h.service
            let vm = try await svc.create(CreateVMRequest(image: "rootfs"))
            let sh = try await svc.guestShell(vm.id, timeout: .seconds(60))
            // A first snapshot writes back what the boot dirtied; the one measured below has
            // only the guest's new random bytes to write.
            try await svc.deleteSnapshot(svc.snapshot(vm.id).id)
            let sum = try await guest(sh, "head -c 40000000 /dev/urandom > /tmp/r && sha256sum /tmp/r")
            // Leave 8 MiB: far less than the 40 MB of incompressible guest RAM to write.
            let filler = fs + "/filler"
            let fd = open(filler, O_CREAT | O_WRONLY, 0o600)
            try #require(fd >= 0)
            let fill = Int(freeBytes()) - (8 << 20)
            try #require(fill > 0 && posix_fallocate(fd, 0, fill) == 0, "fill the tmpfs")
            close(fd)
            do {
                let s = try await svc.snapshot(vm.id)
                Issue.record("a snapshot into a full store succeeded: \(s.id)")
            } catch let e as FurcateError {
                #expect(e.code == .diskFull, "\(e)")
                #expect(e.description.contains("disk full"), "\(e)")
            }
            #expect(try await svc.info(vm.id).state == .running)
            #expect(await svc.listSnapshots().isEmpty, "no half-made snapshot is listed")
            let qemu = try #require(await svc.process(vm.id))
            #expect(try await qemu.runStatus() == "running", "not paused by a disk error")
            #expect(try await guest(sh, "sha256sum /tmp/r") == sum, "the guest's memory is as it was")
            // Room again: the same snapshot now succeeds, and the VM still runs.
            try FileManager.default.removeItem(atPath: filler)
            let snap = try await svc.snapshot(vm.id)
            #expect(try await guest(sh, "sha256sum /tmp/r") == sum)
            let report = try h.store.fsck()
            #expect(report.clean, "\(report.problems)")
            // Delete and collect: the space comes back.
            try await svc.deleteSnapshot(snap.id)
            try await svc.delete(vm.id)
            _ = try h.store.gc()
            #expect(freeBytes() + (4 << 20) >= freeAtStart, "free \(freeBytes()) of \(freeAtStart) at the start")
        } catch {
            Issue.record(error)
        }
        await h.tearDown()
    }

    /// A VM on a network of its own (VMNetwork, QEMU on the namespace's tap): the guest reaches
    /// the test's internet and nothing of the host (not its loopback through the gateway, not
    /// the host's end of the veth) nor link-local or private ranges; a fork gets a network of
    /// its own and reaches the internet at once; a policy change on the running VM holds at
    /// once and its forks inherit it; deleting them removes their namespaces.
    @Test(.timeLimit(.minutes(10)), .enabled(if: networkAvailable))
    func aVMOnItsOwnNetworkReachesTheInternetAndNotTheHost() async throws {
        try await NetworkFixture.with { f in await Self.ownNetwork(f) }
    }

    static func ownNetwork(_ f: NetworkFixture) async {
        let net = f.host
        await withHarness(configure: { $0.networks = net }) { _, svc in
            let vm = try await svc.create(CreateVMRequest(image: "rootfs"))
            let sh = try await svc.guestShell(vm.id, timeout: .seconds(60))
            // busybox's nc (its static wget crashes resolving even an address): the body's line.
            func fetch(_ target: String) -> String {
                let hostPort = target.split(separator: ":").joined(separator: " ")
                return "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 \(hostPort) 2>/dev/null | tail -n 1; echo"
            }
            #expect(try await guest(sh, fetch("198.51.100.10:8000")) == "inet-8000")
            let index = try #require(try await svc.info(vm.id).networkIndex)
            let plan = try net.plan(index)
            for target in [
                "10.0.2.2:\(f.hostPort)", "\(plan.hostAddress):\(f.hostPort)", "169.254.169.254:8000",
                "192.168.77.10:8000",
            ] {
                let out = try await guest(sh, fetch(target))
                #expect(out.isEmpty, "\(target) answered: \(out)")
            }
            let fork = try await svc.fork(vm.id, count: 1).vms[0]
            let fsh = try await svc.guestShell(fork.id, timeout: .seconds(60))
            #expect(try await guest(fsh, fetch("198.51.100.10:8000")) == "inet-8000")
            let forkIndex = try await svc.info(fork.id).networkIndex
            #expect(forkIndex != nil && forkIndex != index)
            #expect(try net.namespaces().count == 2)
            try await svc.delete(fork.id)

            // A policy change on the running VM is in force when the call returns (well within
            // 1 s): only 192.168.77.10 (a private address, so only by name) and nothing public.
            let t0 = ContinuousClock.now
            let narrowed = EgressPolicy(
                allowPublic: false, allowedNetworks: [try IPv4Network(parsing: "192.168.77.10/32")])
            try await svc.setEgress(vm.id, narrowed)
            let took = ContinuousClock.now - t0
            #expect(took < .seconds(1), "setEgress took \(took)")
            #expect(try await guest(sh, fetch("192.168.77.10:8000")) == "inet-8000")
            #expect(try await guest(sh, fetch("198.51.100.10:8000")).isEmpty)
            #expect(try await svc.info(vm.id).egress == narrowed)
            // A fork inherits it, and so does a VM restored from its snapshot.
            let heir = try await svc.fork(vm.id, count: 1).vms[0]
            #expect(heir.egress == narrowed)
            let hsh = try await svc.guestShell(heir.id, timeout: .seconds(60))
            #expect(try await guest(hsh, fetch("192.168.77.10:8000")) == "inet-8000")
            #expect(try await guest(hsh, fetch("198.51.100.10:8000")).isEmpty)
            try await svc.delete(heir.id)
            // Back to the service's default.
            try await svc.setEgress(vm.id, nil)
            #expect(try await guest(sh, fetch("198.51.100.10:8000")) == "inet-8000")
            #expect(try await guest(sh, fetch("192.168.77.10:8000")).isEmpty)

            // The guest's resolver: with public egress it answers any name (from the test
            // internet's DNS server)...
            func lookup(_ name: String) -> String {
                "nslookup \(name) \(GuestAddressing.resolver) 2>/dev/null | sed -n '3,$p' | grep -o '[0-9.]*\\.[0-9]*$' | head -n 1; echo"
            }
            #expect(try await guest(sh, lookup("other.test")) == "198.51.100.10")
            // ...and with a name allow-list only: an allowed name's address is not reachable
            // until the guest resolves the name, another name is refused, and a name that
            // points at a private address resolves but does not open it.
            let byName = EgressPolicy(allowPublic: false, allowedDomains: ["allowed.test"])
            try await svc.setEgress(vm.id, byName)
            #expect(try await guest(sh, fetch("198.51.100.10:8000")).isEmpty)
            #expect(try await guest(sh, lookup("other.test")).isEmpty)
            #expect(try await guest(sh, fetch("198.51.100.10:8000")).isEmpty)
            #expect(try await guest(sh, lookup("www.allowed.test")) == "198.51.100.10")
            #expect(try await guest(sh, fetch("198.51.100.10:8000")) == "inet-8000")
            #expect(try await guest(sh, lookup("private.allowed.test")) == "192.168.77.10")
            #expect(try await guest(sh, fetch("192.168.77.10:8000")).isEmpty)
            // Changing the allowed names closes what the old ones opened, at once.
            try await svc.setEgress(vm.id, EgressPolicy(allowPublic: false, allowedDomains: ["elsewhere.test"]))
            #expect(try await guest(sh, fetch("198.51.100.10:8000")).isEmpty)
            #expect(try await guest(sh, lookup("allowed.test")).isEmpty)
            try await svc.delete(vm.id)
            #expect(try net.namespaces().isEmpty && net.hostLinks().isEmpty)
        }
    }
}

/// Replaces a snapshot's device state with damaged bytes of the same length; returns the good ones.
func damageDeviceState(_ store: BlockStore, _ snap: SnapshotInfo) throws -> [UInt8] {
    let good = try store.file(snap.stateFile).read(at: 0, count: snap.deviceStateBytes)
    var bad = good
    for i in stride(from: 64, to: bad.count, by: 97) { bad[i] ^= 0x5a }
    try store.delete(snap.stateFile)
    try store.createFile("bad").write(bad, at: 0)
    try store.snapshot("bad", as: snap.stateFile)
    try store.delete("bad")
    return good
}
