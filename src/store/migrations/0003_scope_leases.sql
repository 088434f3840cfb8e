CREATE TABLE "resources" (
	"id" text PRIMARY KEY NOT NULL,
	"kind" text NOT NULL,
	"ownership" text NOT NULL,
	"lease_id" text,
	"created_at" timestamp with time zone DEFAULT now() NOT NULL,
	"name" text,
	"size_bytes" bigint,
	"sha256" text,
	"content_type" text,
	"content" "bytea",
	"body" jsonb
);
--> statement-breakpoint
CREATE TABLE "scope_leases" (
	"id" text PRIMARY KEY NOT NULL,
	"runtime" text NOT NULL,
	"label" text DEFAULT '' NOT NULL,
	"request_id" text,
	"state" text NOT NULL,
	"close_reason" text,
	"ttl_ms" bigint NOT NULL,
	"created_at" timestamp with time zone DEFAULT now() NOT NULL,
	"expires_at" timestamp with time zone NOT NULL,
	"closed_at" timestamp with time zone,
	"result" jsonb
);
--> statement-breakpoint
CREATE INDEX "resources_lease_idx" ON "resources" USING btree ("lease_id","ownership");--> statement-breakpoint
CREATE INDEX "resources_kind_idx" ON "resources" USING btree ("kind");--> statement-breakpoint
CREATE UNIQUE INDEX "scope_leases_request_id_key" ON "scope_leases" USING btree ("request_id");--> statement-breakpoint
CREATE INDEX "scope_leases_open_expiry_idx" ON "scope_leases" USING btree ("expires_at") WHERE "scope_leases"."state" = 'OPEN';--> statement-breakpoint
CREATE INDEX "scope_leases_label_idx" ON "scope_leases" USING btree ("label");