import Builds
import Foundation
import FurcateCore
import FurcateEngine
import Images

/// The InstaVM dialect's request bodies (seeds 000–002 and what the `instavm` SDK sends), with
/// the vendor's field names.
extension InstaVMRoutes {
    /// Environment variables for the guest: names of letters, digits and `_` (not first a
    /// digit), values without newlines or NUL.
    static func checkEnvironment(_ env: [String: String]?, _ field: String) throws {
        for (k, v) in env ?? [:] {
            let name = k.unicodeScalars
            guard let first = name.first, !CharacterSet.decimalDigits.contains(first),
                name.allSatisfy({ $0 == "_" || CharacterSet.alphanumerics.contains($0) }), !v.contains("\n"),
                !v.contains("\0")
            else {
                throw FieldProblem(
                    [field, k], .invalid("environment names are letters, digits and _; values have no newlines"))
            }
        }
    }

    /// `{"session_id": …}` (kill).
    struct SessionRequest: JSONBody {
        static let fields: Set<String> = ["session_id"]
        var session_id: String
    }

    /// VMSnapshotRequest: a name for the snapshot.
    struct SnapshotVMRequest: JSONBody {
        static let fields: Set<String> = ["name"]
        var name: String?
        func validate() throws { try FieldProblem.check(name, "name", max: 256) }
    }

    /// VMCloneRequest: a name for the snapshot the clone is made from.
    struct CloneVMRequest: JSONBody {
        static let fields: Set<String> = ["snapshot_name"]
        var snapshot_name: String?
        func validate() throws { try FieldProblem.check(snapshot_name, "snapshot_name", max: 256) }
    }

    /// SnapshotCreateRequest: a snapshot built from an OCI image.
    struct CreateSnapshotRequest: JSONBody {
        static let fields: Set<String> = ["oci_image", "name", "vcpu_count", "memory_mb", "build_args", "type"]
        var oci_image: String
        var name: String?
        var vcpu_count, memory_mb: Int?
        var build_args: BuildArgs?
        var type: SnapshotKind?

        struct BuildArgs: Decodable {
            static let fields: Set<String> = [
                "extra_apt_packages", "extra_pip_packages", "extra_npm_packages", "git_clone_url", "git_clone_branch",
                "disk_size_gb", "envs", "post_build_cmd",
            ]
            var extra_apt_packages, extra_pip_packages, extra_npm_packages, git_clone_url, git_clone_branch: String?
            var disk_size_gb: Int?
            var envs: [String: String]?
            var post_build_cmd: String?

            private enum CodingKeys: String, CodingKey {
                case extra_apt_packages, extra_pip_packages, extra_npm_packages, git_clone_url, git_clone_branch
                case disk_size_gb, envs, post_build_cmd
            }

            init(from decoder: any Decoder) throws {
                try decoder.refuseFields(except: Self.fields)
                let c = try decoder.container(keyedBy: CodingKeys.self)
                extra_apt_packages = try c.decodeIfPresent(String.self, forKey: .extra_apt_packages)
                extra_pip_packages = try c.decodeIfPresent(String.self, forKey: .extra_pip_packages)
                extra_npm_packages = try c.decodeIfPresent(String.self, forKey: .extra_npm_packages)
                git_clone_url = try c.decodeIfPresent(String.self, forKey: .git_clone_url)
                git_clone_branch = try c.decodeIfPresent(String.self, forKey: .git_clone_branch)
                disk_size_gb = try c.decodeIfPresent(Int.self, forKey: .disk_size_gb)
                envs = try c.decodeIfPresent([String: String].self, forKey: .envs)
                post_build_cmd = try c.decodeIfPresent(String.self, forKey: .post_build_cmd)
            }

            var args: InstaVMBuildArgs {
                var a = InstaVMBuildArgs()
                (a.extraAptPackages, a.extraPipPackages, a.extraNpmPackages) = (
                    extra_apt_packages, extra_pip_packages, extra_npm_packages
                )
                (a.gitCloneUrl, a.gitCloneBranch, a.diskSizeGb) = (git_clone_url, git_clone_branch, disk_size_gb)
                (a.envs, a.postBuildCmd) = (envs, post_build_cmd)
                return a
            }
        }

        func validate() throws {
            try FieldProblem.check(oci_image, "oci_image", max: 512)
            do { _ = try ImageReference(parsing: oci_image) } catch let e as FurcateError {
                throw FieldProblem(["oci_image"], .invalid(e.message))
            }
            try FieldProblem.check(name, "name", max: 256)
            try FieldProblem.check(vcpu_count, "vcpu_count", in: 1...8)
            try FieldProblem.check(memory_mb, "memory_mb", in: 128...8192)
            try FieldProblem.check(build_args?.disk_size_gb, "build_args.disk_size_gb", in: 1...16)
            try FieldProblem.check(build_args?.post_build_cmd, "build_args.post_build_cmd", max: 65536)
            try checkEnvironment(build_args?.envs, "build_args.envs")
        }
    }

    /// What a new VM or session takes (VMCreateRequest, and the session's body).
    struct NewVMRequest: Decodable {
        var vm_lifetime_seconds, memory_mb, vcpu_count: Int?
        var env: [String: String]?
        var metadata: [String: JSONValue]?
        var snapshot_id: String?
        var snapshot_on_terminate, auto_suspend, auto_resume: Bool?
        var egress_policy: EgressRequest?
        var share: ShareRequest?

        func validate() throws {
            try egress_policy?.validate()
            try share?.validate()
            try FieldProblem.check(vm_lifetime_seconds, "vm_lifetime_seconds", in: 20...86_400)
            try FieldProblem.check(memory_mb, "memory_mb", in: 128...8192)
            try FieldProblem.check(vcpu_count, "vcpu_count", in: 1...8)
            try FieldProblem.check(snapshot_id, "snapshot_id", max: 64)
            try checkEnvironment(env, "env")
            if snapshot_on_terminate == true || auto_suspend == true || auto_resume == true {
                throw FieldProblem(
                    [], .notSupported("snapshot_on_terminate, auto_suspend and auto_resume are not supported yet"))
            }
        }
    }

    /// A body that is a `NewVMRequest` with fields of its own beside it, in the same object.
    protocol NewVMBody: JSONBody {
        associatedtype Own: Decodable
        init(own: Own, vm: NewVMRequest)
    }

    /// VMCreateRequest.
    struct CreateVMRequest: NewVMBody {
        static let fields: Set<String> = [
            "session_id", "vm_lifetime_seconds", "memory_mb", "vcpu_count", "metadata", "env", "snapshot_id",
            "snapshot_on_terminate", "auto_suspend", "auto_resume", "egress_policy", "share",
        ]
        /// The vendor's document (seed 001) and the SDK's other fields.
        static let documentedFields: Set<String> = [
            "snapshot_name", "custom_domain", "image_variant", "volumes", "vault_ids",
        ]
        struct Own: Decodable { var session_id: String? }
        var own: Own
        var vm: NewVMRequest

        func validate() throws {
            guard own.session_id == nil else {
                throw FieldProblem(
                    ["session_id"],
                    .notSupported("attaching a VM to an existing session is not supported; omit session_id"))
            }
            try vm.validate()
        }
    }

    /// The session's body: the SDK sends its key here, not in a header.
    struct StartSessionRequest: NewVMBody {
        static let fields: Set<String> = [
            "api_key", "vm_lifetime_seconds", "memory_mb", "vcpu_count", "metadata", "env",
        ]
        struct Own: Decodable { var api_key: String? }
        var own: Own
        var vm: NewVMRequest

        func validate() throws {
            try FieldProblem.check(own.api_key, "api_key", max: 256)
            try vm.validate()
        }
    }

    /// ExecuteRequest.
    struct ExecuteRequest: JSONBody {
        static let fields: Set<String> = ["command", "session_id", "language", "timeout"]
        var command, session_id: String
        var language: String?
        var timeout: Int?

        /// The command as the guest runs it.
        var argv: [String] {
            get throws {
                switch language?.lowercased() {
                case nil, "bash", "shell", "sh": return ["/bin/sh", "-c", command]
                case "python", "python3": return ["python3", "-c", command]
                case let l?:
                    throw FieldProblem(["language"], .invalid("language must be bash or python, not '\(l.prefix(40))'"))
                }
            }
        }

        func validate() throws {
            try FieldProblem.check(command, "command", max: 1 << 20)
            try FieldProblem.check(timeout, "timeout", in: 1...86_400)
            _ = try argv
        }
    }
}

extension InstaVMRoutes.NewVMBody {
    /// Both parts from the one object: its own fields and the new VM's.
    init(from decoder: any Decoder) throws {
        self.init(own: try Own(from: decoder), vm: try InstaVMRoutes.NewVMRequest(from: decoder))
    }
}
