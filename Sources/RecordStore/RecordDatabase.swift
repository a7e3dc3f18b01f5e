// RecordStore: small SQLite databases of JSON records (VMs, snapshots, images, builds) through
// GRDB — WAL, a busy timeout, migrations, errors as FurcateError naming the database.
import Foundation
import FurcateCore
import GRDB

/// A table of JSON records under string keys, with optional extra columns written beside them.
public struct RecordTable: Sendable {
    /// The SQL table's name.
    public let name: String
    /// Its primary key column.
    public let key: String
    /// The column holding the record's JSON.
    public let value: String
    /// Further columns, filled from `save`'s `extra` in this order (for indexes and queries).
    public let extra: [String]

    /// A table named `name` with its key, record and extra columns.
    public init(_ name: String, key: String = "id", value: String = "record", extra: [String] = []) {
        self.name = name
        self.key = key
        self.value = value
        self.extra = extra
    }
}

/// A SQLite database (WAL, via GRDB) of `RecordTable`s: records saved and read as JSON.
public final class RecordDatabase: Sendable {
    /// The connection pool; readers run beside the one writer.
    public let pool: DatabasePool
    /// What the database holds, for error messages ("VM", "image", "build").
    let what: String

    /// Opens (creating) the database and applies `migrations` in order (v1, v2, …).
    /// - Throws: `.io` naming the database.
    public init(path: String, what: String, migrations: [String]) throws {
        self.what = what
        var config = Configuration()
        config.busyMode = .timeout(5)
        do {
            pool = try DatabasePool(path: path, configuration: config)
            var migrator = DatabaseMigrator()
            for (i, sql) in migrations.enumerated() {
                migrator.registerMigration("v\(i + 1)") { db in try db.execute(sql: sql) }
            }
            try migrator.migrate(pool)
        } catch {
            throw FurcateError(
                .io, "cannot open the \(what) database", path: path, underlying: UnderlyingMessage(error))
        }
    }

    /// Inserts or replaces the record under `key`; `extra` fills the table's extra columns.
    public func save<T: Encodable>(_ t: RecordTable, key: String, _ value: T, extra: [String] = []) throws {
        let data = try JSONEncoder().encode(value)
        let columns = [t.key] + t.extra + [t.value]
        let sql =
            "INSERT OR REPLACE INTO \(t.name) (\(columns.joined(separator: ", "))) VALUES (\(columns.map { _ in "?" }.joined(separator: ", ")))"
        let arguments = StatementArguments([key] + extra) + StatementArguments([data])
        try write { try $0.execute(sql: sql, arguments: arguments) }
    }

    /// Deletes the record under `key`; a missing one is no error.
    public func delete(_ t: RecordTable, key: String) throws {
        try write { try $0.execute(sql: "DELETE FROM \(t.name) WHERE \(t.key) = ?", arguments: [key]) }
    }

    /// The record under `key`, if any.
    public func get<T: Decodable>(_ t: RecordTable, key: String, as type: T.Type = T.self) throws -> T? {
        do {
            return try pool.read { db in
                try Data.fetchOne(db, sql: "SELECT \(t.value) FROM \(t.name) WHERE \(t.key) = ?", arguments: [key])
                    .map { try JSONDecoder().decode(T.self, from: $0) }
            }
        } catch {
            throw FurcateError(
                .io, "cannot read the \(what) database (\(t.name))", path: pool.path,
                underlying: UnderlyingMessage(error))
        }
    }

    /// Every record, in insertion order.
    public func all<T: Decodable>(_ t: RecordTable, as type: T.Type = T.self) throws -> [T] {
        try allKeyed(t, as: type).map(\.value)
    }

    /// Every record with its key, in insertion order.
    public func allKeyed<T: Decodable>(_ t: RecordTable, as type: T.Type = T.self) throws -> [(key: String, value: T)] {
        do {
            return try pool.read { db in
                try Row.fetchAll(db, sql: "SELECT \(t.key) AS k, \(t.value) AS v FROM \(t.name) ORDER BY rowid").map {
                    row in
                    (key: row["k"] as String, value: try JSONDecoder().decode(T.self, from: row["v"] as Data))
                }
            }
        } catch {
            throw FurcateError(
                .io, "cannot read the \(what) database (\(t.name))", path: pool.path,
                underlying: UnderlyingMessage(error))
        }
    }

    private func write(_ body: (Database) throws -> Void) throws {
        do { try pool.write(body) } catch {
            throw FurcateError(
                .io, "cannot write the \(what) database", path: pool.path, underlying: UnderlyingMessage(error))
        }
    }
}
