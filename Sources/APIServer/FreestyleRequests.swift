import Builds
import Foundation
import FurcateCore
import FurcateEngine
import GuestAgentProtocol
import Images

/// The Freestyle dialect's request bodies (seed 004), as the document names their fields.
extension FreestyleRoutes {
    /// Every field the Freestyle document gives a request body, by schema name: a field of the
    /// document this server does not honour may be sent as null (unset); any other is refused.
    static let documentFields: [String: Set<String>] = [
        "CreateVmRequest": [
            "spec", "name", "idleTimeoutSeconds", "ports", "waitForReadySignal", "readySignalTimeoutSeconds", "workdir",
            "persistence", "systemd", "users", "groups", "additionalFiles", "snapshotId", "template", "gitRepos", "git",
            "recreate", "aptDeps", "domains", "activityThresholdBytes", "dockerCredentials",
        ],
        "CreateSnapshotRequest": ["name", "spec", "template", "persistence", "dockerCredentials"],
        "StartVmRequest": [
            "idleTimeoutSeconds", "readySignalTimeoutSeconds", "waitForReadySignal", "activityThresholdBytes",
        ],
        "ResizeVmRequest": ["rootfsSizeGb", "memSizeGb", "vcpuCount"],
        "SystemdUnitSpec": [
            "name", "mode", "exec", "env", "user", "group", "workdir", "after", "requires", "onFailure", "wantedBy",
            "enable", "timeoutSec", "deleteAfterSuccess", "remainAfterExit", "readySignal", "watchdogSec",
            "restartPolicy",
        ],
    ]

    /// A name the API gives a VM or snapshot: at most 256 bytes.
    static func checkName(_ name: String?) throws { try FieldProblem.check(name, "name", max: 256) }

    /// The VM-instance settings of a create or start request (a StartVmRequest), or of a spec
    /// layer.
    struct VMSettings: JSONBody {
        static let fields: Set<String> = ["idleTimeoutSeconds", "waitForReadySignal", "readySignalTimeoutSeconds"]
        static var documentedFields: Set<String> { FreestyleRoutes.documentFields["StartVmRequest"] ?? [] }
        var idleTimeoutSeconds: Int?
        var waitForReadySignal: Bool?
        var readySignalTimeoutSeconds: Int?

        func validate() throws {
            try FieldProblem.check(idleTimeoutSeconds, "idleTimeoutSeconds", in: 0...Int(Int32.max))
            try FieldProblem.check(readySignalTimeoutSeconds, "readySignalTimeoutSeconds", in: 0...3600)
        }

        /// Settings of `self`, with what it leaves unset taken from `other`.
        func over(_ other: VMSettings?) -> VMSettings {
            guard let other else { return self }
            return VMSettings(
                idleTimeoutSeconds: idleTimeoutSeconds ?? other.idleTimeoutSeconds,
                waitForReadySignal: waitForReadySignal ?? other.waitForReadySignal,
                readySignalTimeoutSeconds: readySignalTimeoutSeconds ?? other.readySignalTimeoutSeconds)
        }
    }

    /// A VmPersistence: a type and only that type's fields (default: sticky, priority 5).
    struct PersistenceField: Decodable {
        let value: VMPersistence

        init(from decoder: any Decoder) throws {
            struct Tagged: Decodable { var type: String }
            let type = try Tagged(from: decoder).type
            let fields: Set<String> =
                type == "sticky" ? ["type", "priority"] : type == "ephemeral" ? ["type", "deleteEvent"] : ["type"]
            do { try decoder.refuseFields(except: fields) } catch let p as FieldProblem {
                guard case .unsupported(let extra, _) = p.kind else { throw p }
                throw FieldProblem(
                    p.path, .invalid("persistence of type \(type.prefix(20)) has no field '\(extra[0].prefix(40))'"))
            }
            value = try VMPersistence(from: decoder)
        }
    }

    /// A VmSpec: a label and a SnapshotSpec's fields.
    struct VmSpec: Decodable {
        var name: String?
        var contents: FreestyleSnapshotSpec
        /// The settings its `snapshot` (the outer layer) gives VMs made from it.
        var settings: VMSettings?

        init(from decoder: any Decoder) throws {
            struct Parts: Decodable {
                var name: String?
                var snapshot: VMSettings?
            }
            let parts = try Parts(from: decoder)
            (name, settings) = (parts.name, parts.snapshot)
            try settings?.validate()
            contents = try FreestyleSnapshotSpec(from: decoder)
        }
    }

    /// CreateVmRequest: from `snapshotId`, a `spec`, its own layer fields (a build), or the
    /// default image.
    struct CreateVmRequest: JSONBody {
        /// The fields that describe the VM's contents: with them, the VM is made from a build
        /// (cached by template hash) whose outer layer they are, on `spec` or `snapshotId`.
        static let layerFields: Set<String> = [
            "workdir", "systemd", "users", "groups", "additionalFiles", "git", "aptDeps",
        ]
        static let fields = Set([
            "snapshotId", "name", "dockerCredentials", "spec", "persistence", "template", "gitRepos", "ports",
            "domains",
        ])
        .union(layerFields).union(VMSettings.fields)
        static var documentedFields: Set<String> { FreestyleRoutes.documentFields["CreateVmRequest"] ?? [] }

        var snapshotId, name: String?
        var dockerCredentials: DockerCredentials?
        var persistence: VMPersistence
        var spec: VmSpec?
        var settings: VMSettings
        /// PortConfig: `port` (what clients use: 443 or 8081, the document's rule) reaches the
        /// guest's `targetPort`; nil: 3000 on 443, as the document says; []: none.
        var ports: [PortConfig]?
        /// VmDomainConfig: a host name of the account's own for a guest port (default 443).
        var domains: [DomainConfig]?
        /// The contents to build, when the request describes them: its own layer over `spec`
        /// or `snapshotId`, or `spec` alone.
        var contents: FreestyleSnapshotSpec?

        struct PortConfig: Decodable {
            var port, targetPort: Int

            init(port: Int, targetPort: Int) { (self.port, self.targetPort) = (port, targetPort) }

            private enum CodingKeys: String, CodingKey { case port, targetPort }

            init(from decoder: any Decoder) throws {
                try decoder.refuseFields(except: ["port", "targetPort"])
                let c = try decoder.container(keyedBy: CodingKeys.self)
                (port, targetPort) = (
                    try c.decode(Int.self, forKey: .port), try c.decode(Int.self, forKey: .targetPort)
                )
            }
        }
        struct DomainConfig: Decodable {
            var domain: String
            var vmPort: Int?

            private enum CodingKeys: String, CodingKey { case domain, vmPort }

            init(from decoder: any Decoder) throws {
                try decoder.refuseFields(except: ["domain", "vmPort"])
                let c = try decoder.container(keyedBy: CodingKeys.self)
                domain = try c.decode(String.self, forKey: .domain)
                vmPort = try c.decodeIfPresent(Int.self, forKey: .vmPort)
            }
        }

        private struct Fields: Decodable {
            var snapshotId, name: String?
            var dockerCredentials: DockerCredentials?
            var persistence: PersistenceField?
            var spec: VmSpec?
            var ports: [PortConfig]?
            var domains: [DomainConfig]?
        }

        init(from decoder: any Decoder) throws {
            let f = try Fields(from: decoder)
            (snapshotId, name, dockerCredentials, spec) = (f.snapshotId, f.name, f.dockerCredentials, f.spec)
            (ports, domains) = (f.ports, f.domains)
            persistence = f.persistence?.value ?? .sticky
            // The request's own settings, else its spec's outer layer's.
            settings = try VMSettings(from: decoder).over(f.spec?.settings)
            let layer = try FreestyleSnapshotSpec(from: decoder)
            if layer.hasContents {
                contents = layer.over(spec?.contents)
            } else {
                contents = spec.map { s in snapshotId == nil ? s.contents : layer.over(s.contents) }
            }
        }

        func validate() throws {
            try checkName(name)
            try settings.validate()
            for (i, p) in (ports ?? []).enumerated() {
                guard [443, 8081].contains(p.port) else {
                    throw FieldProblem(
                        ["ports", "\(i)", "port"],
                        .invalid("ports.\(i).port must be 443 or 8081 (the ports Freestyle exposes)"))
                }
                try FieldProblem.check(p.targetPort, "ports.\(i).targetPort", in: 1...65535)
            }
            guard (domains ?? []).count <= 16 else {
                throw FieldProblem(["domains"], .invalid("a VM has at most 16 domains"))
            }
            for (i, d) in (domains ?? []).enumerated() {
                do { _ = try Engine.checkDomain(d.domain) } catch let e as FurcateError {
                    throw FieldProblem(["domains", "\(i)", "domain"], .invalid("domains.\(i).domain: \(e.message)"))
                }
                try FieldProblem.check(d.vmPort, "domains.\(i).vmPort", in: 1...65535)
            }
        }

        /// What the VM exposes through the ingress.
        var exposedPorts: [ExposedPort] {
            (ports ?? [PortConfig(port: 443, targetPort: 3000)]).map {
                ExposedPort(port: $0.targetPort, isPublic: true)
            }
                + (domains ?? []).map {
                    ExposedPort(port: $0.vmPort ?? 443, isPublic: true, domain: $0.domain.lowercased())
                }
        }

        /// The deprecated forms in today's: `template` (one layer, plus the VM's
        /// `persistence`) is `spec.snapshot`; `gitRepos` (top level or in the template) are
        /// `git.repos`.
        static func current(_ body: [String: JSONValue]) throws -> [String: JSONValue]? {
            guard body["template", default: .null] != .null || body["gitRepos", default: .null] != .null else {
                return nil
            }
            func withRepos(_ o: [String: JSONValue], at path: [String]) throws -> [String: JSONValue] {
                var o = o
                guard let raw = o.removeValue(forKey: "gitRepos"), raw != .null else { return o }
                guard case .array(let repos) = raw else { throw FieldProblem(path + ["gitRepos"], .wrongType(.array)) }
                var git: [String: JSONValue]
                switch o["git", default: .null] {
                case .null: git = ["config": .object([:])]
                case .object(let g): git = g
                default: throw FieldProblem(path + ["git"], .wrongType(.object))
                }
                // (Found by schemathesis: a git.repos of the wrong type was replaced, not refused.)
                switch git["repos", default: .null] {
                case .null: git["repos"] = .array(repos)
                case .array(let existing): git["repos"] = .array(existing + repos)
                default: throw FieldProblem(path + ["git", "repos"], .wrongType(.array))
                }
                o["git"] = .object(git)
                return o
            }
            var body = try withRepos(body, at: [])
            if let t = body.removeValue(forKey: "template"), t != .null {
                guard body["spec", default: .null] == .null else {
                    throw FieldProblem(
                        ["template"], .invalid("template (deprecated) and spec are mutually exclusive; use spec"))
                }
                guard case .object(var layer) = t else { throw FieldProblem(["template"], .wrongType(.object)) }
                if let p = layer.removeValue(forKey: "persistence"), p != .null {
                    guard body["persistence", default: .null] == .null else {
                        throw FieldProblem(
                            ["persistence"], .invalid("give persistence once: at the top level or in the template"))
                    }
                    body["persistence"] = p
                }
                body["spec"] = ["snapshot": .object(try withRepos(layer, at: ["template"]))]
            }
            return body
        }
    }

    /// Freestyle's DockerCredentials: all three fields, strings.
    struct DockerCredentials: Decodable {
        var registry, username, password: String
        var registryCredentials: RegistryCredentials { RegistryCredentials(username: username, password: password) }
    }

    struct CreateSnapshotRequest: JSONBody {
        static let fields: Set<String> = ["name", "spec", "persistence", "dockerCredentials"]
        static var documentedFields: Set<String> { FreestyleRoutes.documentFields["CreateSnapshotRequest"] ?? [] }
        var name: String?
        var spec: FreestyleSnapshotSpec?
        var persistence: SnapshotPersistence?
        var dockerCredentials: DockerCredentials?

        func validate() throws {
            try checkName(name)
            guard spec != nil else {
                throw FieldProblem(["spec"], .invalid("give a spec (the deprecated template is not supported)"))
            }
        }
    }

    /// SnapshotVmRequest.
    struct SnapshotVmRequest: JSONBody {
        static let fields: Set<String> = ["name", "persistence"]
        var name: String?
        var persistence: SnapshotPersistence?
        func validate() throws { try checkName(name) }
    }

    struct UpdateSnapshotRequest: JSONBody {
        static let fields: Set<String> = ["name"]
        var name: String?
        func validate() throws { try checkName(name) }
    }

    struct ForkVmRequest: JSONBody {
        static let fields: Set<String> = ["count"]
        var count: Int?
        func validate() throws { try FieldProblem.check(count, "count", in: 1...100) }
    }

    struct ExecAwaitRequest: JSONBody {
        static let fields: Set<String> = ["command", "terminal", "timeoutMs"]
        var command: String
        var terminal: String?
        var timeoutMs: Int?

        func validate() throws {
            if let t = timeoutMs, t < 0 {
                throw FieldProblem(["timeoutMs"], .invalid("timeoutMs must not be negative"))
            }
        }
    }

    struct WatchFilesRequest: JSONBody {
        static let fields: Set<String> = ["path", "recursive"]
        var path: String?
        var recursive: Bool?

        func validate() throws {
            if let p = path, !p.hasPrefix("/") || p.split(separator: "/").contains("..") || p.utf8.count > 4096 {
                throw FieldProblem(["path"], .invalid("path must be absolute, without '..'"))
            }
        }
    }

    struct ResizeVmRequest: JSONBody {
        static let fields: Set<String> = ["rootfsSizeGb", "memSizeGb", "vcpuCount"]
        var rootfsSizeGb, memSizeGb, vcpuCount: Int?

        func validate() throws {
            guard memSizeGb == nil, vcpuCount == nil else {
                throw FieldProblem(
                    [memSizeGb != nil ? "memSizeGb" : "vcpuCount"],
                    .notSupported(
                        "memory and vCPUs cannot change while a VM runs here; snapshot it and create a VM with the new size"
                    ))
            }
            guard rootfsSizeGb != nil else { throw FieldProblem(["rootfsSizeGb"], .missing) }
            try FieldProblem.check(rootfsSizeGb, "rootfsSizeGb", in: 1...16)
        }
    }

    /// A SystemdUnitSpec: the agent's service spec, with the fields it honours (`wantedBy`
    /// only as its default); `onFailure`, `readySignal` and `watchdogSec` are refused unless null.
    struct UnitRequest: JSONBody {
        static let fields: Set<String> = [
            "name", "mode", "exec", "env", "user", "group", "workdir", "after", "requires", "enable", "timeoutSec",
            "deleteAfterSuccess", "remainAfterExit", "restartPolicy", "wantedBy",
        ]
        static var documentedFields: Set<String> { FreestyleRoutes.documentFields["SystemdUnitSpec"] ?? [] }
        var spec: ServiceSpec
        var wantedBy: [String]?

        init(from decoder: any Decoder) throws {
            struct Wanted: Decodable { var wantedBy: [String]? }
            wantedBy = try Wanted(from: decoder).wantedBy
            spec = try ServiceSpec(from: decoder)
        }

        func validate() throws {
            if let w = wantedBy, w != ["multi-user.target"] {
                throw FieldProblem(["wantedBy"], .notSupported("wantedBy can only be [\"multi-user.target\"] here"))
            }
            if let p = spec.problem { throw FieldProblem([], .invalid(p)) }
        }
    }
}
