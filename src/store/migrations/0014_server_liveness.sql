-- The server processes on the database and how long each counts as alive: the spreading of worker
-- streams counts only processes that marked themselves recently, not one that hangs with its
-- connections open.
CREATE TABLE "server_processes" (
	"id" text PRIMARY KEY NOT NULL,
	"application_name" text NOT NULL,
	"alive_until" timestamp with time zone NOT NULL
);
