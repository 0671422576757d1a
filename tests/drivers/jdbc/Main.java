// pgjdbc through pgvigil: one line per check (`ok NAME[: detail]` or `FAIL NAME: why`), exit
// status 1 if any failed. Run as a single source file, with the driver on the class path:
//   java -cp /usr/share/java/postgresql.jar Main.java
// The connection parameters come from libpq's environment variables (PGHOST, PGPORT, PGUSER,
// PGPASSWORD, PGDATABASE); PGVIGIL_REPLICA_PORTS lists the replicas' ports, comma-separated.

import java.io.StringReader;
import java.io.StringWriter;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.HashSet;
import java.util.List;
import java.util.Properties;
import java.util.Set;
import org.postgresql.PGConnection;
import org.postgresql.PGNotification;
import org.postgresql.PGStatement;
import org.postgresql.copy.CopyManager;

public class Main {
    /** Reads a fresh connection makes: all on the primary by chance about once in 500,000 runs. */
    static final int READS = 12;
    /** Bound on a cancel's effect, generous for a loaded machine. */
    static final long CANCEL_WITHIN_MS = 10_000;

    interface Check {
        /** Runs the check; what it returns, if not null, is printed after its name. */
        String run() throws Exception;
    }

    static int failed = 0;

    static void check(String name, Check body) {
        long started = System.nanoTime();
        try {
            String detail = body.run();
            long ms = (System.nanoTime() - started) / 1_000_000;
            System.out.println("ok " + name + (detail == null ? "" : ": " + detail) + " (" + ms + " ms)");
        } catch (Throwable e) {
            failed++;
            System.out.println("FAIL " + name + ": " + e);
            e.printStackTrace();
        }
        System.out.flush();
    }

    static String env(String name) {
        String value = System.getenv(name);
        if (value == null) {
            throw new IllegalStateException(name + " is not set");
        }
        return value;
    }

    /** A connection through pgvigil, with extra driver properties as "key=value" pairs. */
    static Connection connect(String... extra) throws SQLException {
        String url = "jdbc:postgresql://" + env("PGHOST") + ":" + env("PGPORT") + "/" + env("PGDATABASE");
        Properties props = new Properties();
        props.setProperty("user", env("PGUSER"));
        props.setProperty("password", env("PGPASSWORD"));
        props.setProperty("loginTimeout", "10");
        props.setProperty("socketTimeout", "120");
        for (String pair : extra) {
            String[] kv = pair.split("=", 2);
            props.setProperty(kv[0], kv[1]);
        }
        return DriverManager.getConnection(url, props);
    }

    static void require(boolean condition, String what) {
        if (!condition) {
            throw new AssertionError(what);
        }
    }

    static long count(Connection conn, String table) throws SQLException {
        try (Statement st = conn.createStatement();
                ResultSet rs = st.executeQuery("SELECT count(*) FROM " + table)) {
            rs.next();
            return rs.getLong(1);
        }
    }

    static void recreate(Connection conn, String table, String columns) throws SQLException {
        try (Statement st = conn.createStatement()) {
            st.execute("DROP TABLE IF EXISTS " + table);
            st.execute("CREATE TABLE " + table + " (" + columns + ")");
        }
    }

    static String connectAndQuery() throws Exception {
        try (Connection conn = connect(); Statement st = conn.createStatement();
                ResultSet rs = st.executeQuery("SELECT 1")) {
            rs.next();
            require(rs.getInt(1) == 1, "SELECT 1 returned " + rs.getInt(1));
            return "server " + conn.getMetaData().getDatabaseProductVersion();
        }
    }

    static String preparedPastThreshold() throws Exception {
        // pgjdbc switches a PreparedStatement to a named server-side statement once it ran
        // prepareThreshold times (5); the session's reads move between nodes meanwhile.
        try (Connection conn = connect();
                PreparedStatement ps = conn.prepareStatement("SELECT ?::int + 1, inet_server_port()")) {
            int threshold = ps.unwrap(PGStatement.class).getPrepareThreshold();
            int runs = threshold * 3;
            for (int i = 0; i < runs; i++) {
                ps.setInt(1, i);
                try (ResultSet rs = ps.executeQuery()) {
                    rs.next();
                    require(rs.getInt(1) == i + 1, "run " + i + " returned " + rs.getInt(1));
                }
            }
            require(ps.unwrap(PGStatement.class).isUseServerPrepare(), "not server-prepared");
            return runs + " runs past prepareThreshold=" + threshold + ", server-prepared";
        }
    }

    static String batch(String table, String... extra) throws Exception {
        try (Connection conn = connect(extra)) {
            recreate(conn, table, "id int PRIMARY KEY, name text");
            try (PreparedStatement ps = conn.prepareStatement("INSERT INTO " + table + " VALUES (?, ?)")) {
                for (int i = 0; i < 500; i++) {
                    ps.setInt(1, i);
                    ps.setString(2, "n" + i);
                    ps.addBatch();
                }
                int[] counts = ps.executeBatch();
                require(counts.length == 500, counts.length + " update counts");
            }
            long rows = count(conn, table);
            require(rows == 500, rows + " rows");
            return "executeBatch of 500 rows" + (extra.length == 0 ? "" : " with " + String.join(",", extra));
        }
    }

    static String transactionErrorThenRollback() throws Exception {
        try (Connection conn = connect()) {
            recreate(conn, "jdbc_tx", "id int");
            conn.setAutoCommit(false);
            try (Statement st = conn.createStatement()) {
                st.execute("INSERT INTO jdbc_tx VALUES (1)");
                try {
                    st.execute("SELECT 1 / 0");
                    throw new AssertionError("1 / 0 did not fail");
                } catch (SQLException e) {
                    require("22012".equals(e.getSQLState()), "SQLSTATE " + e.getSQLState());
                }
                try {
                    st.execute("SELECT 1");
                    throw new AssertionError("the failed transaction accepted a statement");
                } catch (SQLException e) {
                    require("25P02".equals(e.getSQLState()), "SQLSTATE " + e.getSQLState());
                }
            }
            conn.rollback();
            long rows = count(conn, "jdbc_tx");
            require(rows == 0, "the rolled back row is there (" + rows + ")");
            conn.commit();
            return null;
        }
    }

    static String copyInAndOut() throws Exception {
        try (Connection conn = connect()) {
            recreate(conn, "jdbc_copy", "id int, name text");
            CopyManager copy = conn.unwrap(PGConnection.class).getCopyAPI();
            StringBuilder data = new StringBuilder();
            for (int i = 0; i < 1000; i++) {
                data.append(i).append("\tn").append(i).append('\n');
            }
            long in = copy.copyIn("COPY jdbc_copy FROM STDIN", new StringReader(data.toString()));
            require(in == 1000, in + " rows copied in");
            StringWriter out = new StringWriter();
            long outRows = copy.copyOut("COPY (SELECT id, name FROM jdbc_copy ORDER BY id) TO STDOUT", out);
            require(outRows == 1000, outRows + " rows copied out");
            require(out.toString().equals(data.toString()), "what came out is not what went in");
            return "1000 rows in and out";
        }
    }

    static String listenNotify() throws Exception {
        try (Connection listener = connect(); Connection notifier = connect()) {
            try (Statement st = listener.createStatement()) {
                st.execute("LISTEN jdbc_channel");
            }
            try (Statement st = notifier.createStatement()) {
                st.execute("NOTIFY jdbc_channel, 'hello'");
            }
            PGNotification[] got = listener.unwrap(PGConnection.class).getNotifications(10_000);
            require(got != null && got.length == 1, "notifications: " + (got == null ? 0 : got.length));
            require("hello".equals(got[0].getParameter()), "payload " + got[0].getParameter());
            return null;
        }
    }

    static String cancel() throws Exception {
        try (Connection conn = connect(); Statement st = conn.createStatement()) {
            Thread canceller = new Thread(() -> {
                try {
                    Thread.sleep(500);
                    st.cancel();
                } catch (Exception e) {
                    e.printStackTrace();
                }
            });
            long started = System.nanoTime();
            canceller.start();
            try {
                st.execute("SELECT pg_sleep(30)");
                throw new AssertionError("the sleep was not cancelled");
            } catch (SQLException e) {
                require("57014".equals(e.getSQLState()), "SQLSTATE " + e.getSQLState() + ": " + e);
            } finally {
                canceller.join();
            }
            long waited = (System.nanoTime() - started) / 1_000_000;
            require(waited < CANCEL_WITHIN_MS, "cancelled only after " + waited + " ms");
            try (ResultSet rs = st.executeQuery("SELECT 1")) {
                rs.next();
                require(rs.getInt(1) == 1, "SELECT 1 after the cancel");
            }
            return "cancelled " + (waited - 500) + " ms after the request";
        }
    }

    static String cursorWithFetchSize() throws Exception {
        // With autocommit off and a fetch size, pgjdbc runs the portal 10 rows per Execute.
        try (Connection conn = connect()) {
            conn.setAutoCommit(false);
            long total = 0;
            try (Statement st = conn.createStatement()) {
                st.setFetchSize(10);
                try (ResultSet rs = st.executeQuery("SELECT g FROM generate_series(1, 1000) AS g")) {
                    while (rs.next()) {
                        total += rs.getInt(1);
                    }
                }
            }
            conn.commit();
            require(total == 500500, "sum " + total);
            return "1000 rows, 10 per fetch";
        }
    }

    /** The replicas' ports, from PGVIGIL_REPLICA_PORTS. */
    static Set<Integer> replicaPorts() {
        Set<Integer> replicas = new HashSet<>();
        for (String port : env("PGVIGIL_REPLICA_PORTS").split(",")) {
            replicas.add(Integer.parseInt(port));
        }
        return replicas;
    }

    /** Fails unless at least one of the ports that served reads is a replica's. */
    static String checkReads(List<Integer> ports) {
        long onReplicas = ports.stream().filter(replicaPorts()::contains).count();
        require(onReplicas > 0, "all " + ports.size() + " reads ran on the primary: ports " + ports);
        return onReplicas + " of " + ports.size() + " reads on replicas";
    }

    static String readOnlyTransactions() throws Exception {
        // setReadOnly(true) makes pgjdbc open each transaction with BEGIN READ ONLY.
        List<Integer> ports = new ArrayList<>();
        try (Connection conn = connect(); Statement st = conn.createStatement()) {
            conn.setAutoCommit(false);
            conn.setReadOnly(true);
            for (int i = 0; i < READS; i++) {
                try (ResultSet rs = st.executeQuery("SELECT inet_server_port()")) {
                    rs.next();
                    ports.add(rs.getInt(1));
                }
                conn.commit();
            }
        }
        return checkReads(ports);
    }

    static String readsOnAFreshConnection() throws Exception {
        // pgjdbc sends SET extra_float_digits and SET application_name with the extended
        // protocol as it connects: they must not keep the reads on the primary (issue 17).
        List<Integer> ports = new ArrayList<>();
        try (Connection conn = connect();
                PreparedStatement ps = conn.prepareStatement("SELECT inet_server_port()")) {
            for (int i = 0; i < READS; i++) {
                try (ResultSet rs = ps.executeQuery()) {
                    rs.next();
                    ports.add(rs.getInt(1));
                }
            }
        }
        return checkReads(ports);
    }

    public static void main(String[] args) {
        System.out.println("driver pgjdbc " + org.postgresql.util.DriverInfo.DRIVER_VERSION);
        check("connect", Main::connectAndQuery);
        check("prepared_past_threshold", Main::preparedPastThreshold);
        check("batch", () -> batch("jdbc_batch"));
        check("batch_rewritten", () -> batch("jdbc_batch_rewritten", "reWriteBatchedInserts=true"));
        check("transaction_error_then_rollback", Main::transactionErrorThenRollback);
        check("copy_in_and_out", Main::copyInAndOut);
        check("listen_notify", Main::listenNotify);
        check("cancel", Main::cancel);
        check("cursor_with_fetch_size", Main::cursorWithFetchSize);
        check("reads_on_a_fresh_connection", Main::readsOnAFreshConnection);
        check("read_only_transactions", Main::readOnlyTransactions);
        System.exit(failed == 0 ? 0 : 1);
    }
}
